#!/usr/bin/env bash
# Issue 13, session 17: the eager launch path. On the GPU machine, from the repo root:
#   experiments/h100-2026-11-27-launch/run.sh OUT PART
#   PART kernels: the kernel GPU tests on this tree (every kernel against its reference, repeated launches, graphs)
#   PART tests5:  call 5's subset: the GPU launch test's first version and the bench's repeated rows
#   PART host:    host_probe.py (an eager attention call's host cost, the session's start, OLD=dir with kernels_old,
#                 against this tree, beside SDPA cuDNN / flash and FlashInfer), PASSES passes (default 5)
#   PART pdl:     pdl_probe.py (the eager decode's host cost with programmatic dependent launch on and off, at
#                 batch 1 and 8, as a call and repeated), PASSES passes (default 5)
#   PART splits:  splits_probe.py (decode at the heuristic's split count and others, beside SDPA cuDNN, graph replay)
#   PART sweep:   splits_sweep.py (decode at every power-of-two split count and the heuristic's, batch 1-128 x
#                 context 1,024-16,384, both addressings, beside SDPA cuDNN), PASSES passes (default 3)
#   PART bench:   python -m kernels.bench --quick --sections peers --decode-cases 1x4096,8x4096 --passes 5 (the
#                 bench's own host-cost rows and ratio lines)
#   PART model:   the engines' GPU tests (tests/test_gpu_model.py: every engine equal to one-at-a-time greedy)
#   PART eager:   engines with CUDA graphs off (enforce_eager=true through engine_overrides), where every kernel launches from Python:
#                 qwen3-0.6b, 64 requests of 512 tokens, 64 out, offline, both engines, 3 repeats, HEAD (HEAD_TREE=
#                 a git archive of the session's start) then this tree
#   PART throughput: the throughput workload (engine=contiguous,paged repeats=3, CUDA graphs on), HEAD then
#                 this tree
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=$PWD/experiments/h100-2026-11-27-launch
mkdir -p "$out"
source "$PWD/experiments/ab.sh"
if [ "$part" = kernels ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_kernel_peers.py --tb=short 2>&1 \
      | tail -30 > "$out/kernels.log"
  tail -n 3 "$out/kernels.log"
elif [ "$part" = host ]; then
  timeout 300 $py $here/host_probe.py ${PASSES:-5} 2>&1 | grep -v Warning > "$out/host.log"
  sed -n '/^SUMMARY/,$p' "$out/host.log"
elif [ "$part" = tests5 ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_kernel_peers.py \
      -k "launch_reuses or repeated or programmatic or bench or peers" --tb=short 2>&1 | tail -5 | tee "$out/tests5.log"
elif [ "$part" = splits ]; then
  timeout 200 $py $here/splits_probe.py ${PASSES:-5} 2>&1 | grep -v Warning | tee "$out/splits.log"
elif [ "$part" = sweep ]; then
  timeout 480 $py $here/splits_sweep.py "$out" ${PASSES:-3} 2>&1 | grep -v Warning | tee "$out/sweep.log"
elif [ "$part" = pdl ]; then
  timeout 240 $py $here/pdl_probe.py ${PASSES:-5} 2>&1 | grep -v Warning | tee "$out/pdl.log"
elif [ "$part" = bench ]; then
  timeout 300 $py -m kernels.bench --quick --sections peers --decode-cases 1x4096,8x4096 --passes 5 \
      --out "$out/peers" 2>&1 | grep -v Warning > "$out/bench_peers.log"
  grep -E "eager host|repeated|decode b|prefill b" "$out/bench_peers.log" | tail -n 12
elif [ "$part" = model ]; then
  timeout 420 $py -m pytest -q -m gpu -s tests/test_gpu_model.py --tb=short 2>&1 \
      | grep -E "requests equal|agreeing|passed|failed|Error|assert" | tail -30 > "$out/model.log"
  tail -n 4 "$out/model.log"
elif [ "$part" = eager ] || [ "$part" = throughput ]; then
  if [ "$part" = eager ]; then
    ab eager 240 model=qwen3-0.6b engine=contiguous,paged workload=fixed workload.num_requests=64 \
        workload.prompt.value=512 workload.output.value=64 arrival=offline repeats=3 name=eager \
        +engine_overrides.contiguous.enforce_eager=true +engine_overrides.paged.enforce_eager=true
  else
    ab throughput 280 +experiment=throughput engine=contiguous,paged repeats=3
  fi 2>&1 | tee "$out/$part.log"
  $py "$here/../h100-2026-11-27-prefill/summarize.py" "$out/runs" | tee -a "$out/$part.log"
  tar czf "$out/${part}_runs.tgz" -C "$out" runs && rm -rf "$out/runs"
fi
