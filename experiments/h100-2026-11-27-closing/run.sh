#!/usr/bin/env bash
# Issue 13, session 18: the closing evidence. On the GPU machine, from the repo root:
#   experiments/h100-2026-11-27-closing/run.sh OUT PART
#   PART splits:  splits_cold.py (decode at every power-of-two split count, timed hot and cold, both addressings,
#                 beside SDPA cuDNN), PASSES passes (default 3)
#   PART kernels: the kernel GPU tests (every kernel against its reference, the launch path, repeats, graphs, peers)
#   PART model:   the engines' GPU tests (tests/test_gpu_model.py, test_gpu_vattention.py: every engine equal to one-at-a-time greedy)
#   PART heads:   the workloads on this tree: throughput and seed_8b (engine=contiguous,paged repeats=3;
#                 model.source=random for seed_8b)
#   PART serve:   experiments/gpu_reference_runs.sh OUT serve (the serve workload offline, with text, and over HTTP)
#   PART tiles:   prefill_tiles.py (prefill tiles that fit two to four programs an SM, against the rule's, both
#                 addressings, beside SDPA cuDNN), PASSES passes (default 3); MID=1: the rule's boundary instead
#   PART bench:   python -m kernels.bench --sections peers (decode and prefill beside every peer)
#   PART eager:   eager_profile.py (an eager decode call at batch 1 and 8: the host's time to issue it, the wall
#                 time, each kernel's device time and the device's idle gaps, PDL on and off)
#   PART before:  the start against this tree, one side after the other (experiments/ab.sh; HEAD_TREE= a
#                 git archive of acadd34, the step anatomy added to the host path as the issue found it):
#                 throughput (engine=contiguous,paged repeats=3) and the serve workload offline (paged, seeds 0-2)
#   PART before8b: the same for seed_8b (model.source=random)
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=$PWD/experiments/h100-2026-11-27-closing
mkdir -p "$out"
if [ "$part" = splits ]; then
  timeout 420 $py $here/splits_cold.py "$out" ${PASSES:-3} 2>&1 | grep -v Warning | tee "$out/splits.log"
elif [ "$part" = kernels ]; then
  timeout ${LIMIT:-300} $py -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_kernel_peers.py \
      tests/test_kernels_sm90.py --tb=short 2>&1 | tail -30 > "$out/kernels.log"
  tail -n 3 "$out/kernels.log"
elif [ "$part" = model ]; then
  timeout ${LIMIT:-420} $py -m pytest -q -m gpu -s tests/test_gpu_model.py tests/test_gpu_vattention.py --tb=short 2>&1 \
      | grep -E "requests equal|agreeing|passed|failed|Error|assert" | tail -30 > "$out/model.log"
  tail -n 4 "$out/model.log"
elif [ "$part" = heads ]; then
  for exp in throughput seed_8b; do
    extra=$([ $exp = seed_8b ] && echo model.source=random)
    timeout 280 $py -m harness +experiment=$exp engine=contiguous,paged repeats=3 $extra report=false \
        hydra.sweep.dir="$out/runs/$exp" 2>&1 | grep -v WARNING | tail -2
  done 2>&1 | tee "$out/heads.log"
  tar czf "$out/heads_runs.tgz" -C "$out" runs && rm -rf "$out/runs"
elif [ "$part" = serve ]; then
  timeout ${LIMIT:-560} bash experiments/gpu_reference_runs.sh "$out/serve" serve > "$out/serve.log" 2>&1
  echo "rc=$?"; grep -E "ok in|sweep:" "$out/serve.log" | tail -20
  tar czf "$out/serve_runs.tgz" -C "$out" serve && rm -rf "$out/serve"
elif [ "$part" = before ] || [ "$part" = before8b ]; then
  source "$PWD/experiments/ab.sh"
  if [ "$part" = before ]; then
    ab throughput 300 +experiment=throughput engine=contiguous,paged repeats=3
    ab offline64 150 model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512 \
        workload.output.value=128 arrival=closed arrival.concurrency=64 seed=0,1,2 name=offline64
  else
    ab seed_8b 280 +experiment=seed_8b engine=contiguous,paged repeats=3 model.source=random
  fi 2>&1 | tee "$out/$part.log"
  tar czf "$out/${part}_runs.tgz" -C "$out" runs && rm -rf "$out/runs"
elif [ "$part" = tiles ]; then
  timeout 300 $py $here/prefill_tiles.py ${PASSES:-3} ${MID:+mid} 2>&1 | grep -v Warning | tee "$out/tiles.log"
elif [ "$part" = eager ]; then
  timeout 200 $py $here/eager_profile.py 2>&1 | grep -v Warning | tee "$out/eager.log"
elif [ "$part" = bench ]; then
  timeout ${LIMIT:-300} $py -m kernels.bench --sections peers --passes ${PASSES:-3} --out "$out/peers" 2>&1 \
      | grep -v Warning > "$out/bench_peers.log"
  tail -n 40 "$out/bench_peers.log"
fi
