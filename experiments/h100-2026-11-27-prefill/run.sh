#!/usr/bin/env bash
# Issue 13, session 16: the prefill kernel's paged addressing. On the GPU machine, from the repo root:
#   experiments/h100-2026-11-27-prefill/run.sh OUT PART
#   PART check: the GPU tests session 15's review mends never ran on (the kernels', and the replayed bf16 decode
#               step against eager)
#   PART probe: probe.py (the prefill kernel of the session's start, OLD=dir with kernels_old, against this tree's
#               and the peers), PASSES passes (default 3); VARIANTS=1: call 2's variants/ instead of OLD
#   PART tune:  probe.py tune (tile configurations of this tree's kernel)
#   PART kernels: the kernel GPU tests on this tree
#   PART decode: decode_ab.py (decode of the session's start, OLD=dir with kernels_old, against this tree's)
#   PART model: the engines' GPU tests (tests/test_gpu_model.py: every engine equal to one-at-a-time greedy) and
#               async scheduling's (call 4 ran them with -m gpu, which selected none)
#   PART heads: throughput and seed_8b (python -m harness +experiment=EXP engine=contiguous,paged repeats=3;
#               model.source=random for seed_8b), HEAD (a git archive of the session's start, 5563564) then this tree
#   PART long:  a prefill-heavy workload: qwen3-0.6b, 64 prompts of 4,096 tokens, 16 out, offline, both engines,
#               3 repeats, HEAD then this tree
#   PART serve: the serve workload offline (qwen3-0.6b, 512/128, paged, 64 closed-loop clients, seeds 0-2), HEAD
#               then this tree
#   PART bench: python -m kernels.bench --sections prefill --peers flashinfer,sdpa_flash,sdpa_cudnn (the full
#               prefill grid beside the peers; decode's kernels compile to the same SASS as before, not timed)
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=$PWD/experiments/h100-2026-11-27-prefill
mkdir -p "$out"
source "$PWD/experiments/ab.sh"
if [ "$part" = check ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py --tb=short 2>&1 | tail -30 > "$out/check_kernels.log"
  timeout 150 $py -m pytest -q -m gpu -s tests/test_gpu_model.py -k decode_step_replayed --tb=short 2>&1 \
      | tail -15 > "$out/check_model.log"
  tail -n 3 "$out"/check_*.log
elif [ "$part" = probe ]; then
  timeout 420 $py $here/probe.py ${PASSES:-3} ${VARIANTS:+variants} 2>&1 | grep -v Warning | tee "$out/probe.log"
elif [ "$part" = tune ]; then
  timeout 300 $py $here/probe.py ${PASSES:-3} tune 2>&1 | grep -v Warning | tee "$out/tune.log"
elif [ "$part" = model ]; then
  timeout 400 $py -m pytest -q -m gpu -s tests/test_gpu_model.py --tb=short 2>&1 \
      | grep -E "requests equal|agreeing|passed|failed|Error|assert" | tail -30 > "$out/model.log"
  timeout 150 $py -m pytest -q tests/test_async_scheduling.py --tb=short 2>&1 | tail -5 >> "$out/model.log"
  tail -n 4 "$out/model.log"
elif [ "$part" = heads ] || [ "$part" = long ] || [ "$part" = serve ]; then
  if [ "$part" = heads ]; then
    ab throughput 300 +experiment=throughput engine=contiguous,paged repeats=3
    ab seed_8b 300 +experiment=seed_8b engine=contiguous,paged repeats=3 model.source=random
  elif [ "$part" = long ]; then
    ab longprompt 280 model=qwen3-0.6b engine=contiguous,paged workload=fixed workload.num_requests=64 \
        workload.prompt.value=4096 workload.output.value=16 arrival=offline engine.max_model_len=4352 \
        '+engine_overrides.paged.enable_prefix_caching=false' repeats=3 name=longprompt
  else
    ab offline64 200 model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512 \
        workload.output.value=128 arrival=closed arrival.concurrency=64 seed=0,1,2 reuse_engine=true name=offline64
  fi 2>&1 | tee "$out/$part.log"
  $py "$here/summarize.py" "$out/runs" | tee -a "$out/$part.log"
  tar czf "$out/${part}_runs.tgz" -C "$out" runs && rm -rf "$out/runs"
elif [ "$part" = bench ]; then
  timeout 240 $py -m kernels.bench --sections prefill --peers flashinfer,sdpa_flash,sdpa_cudnn --out "$out/prefill" \
      2>&1 | grep -v Warning > "$out/bench_prefill.log"
  tail -n 30 "$out/bench_prefill.log"
elif [ "$part" = decode ]; then
  timeout 200 $py $here/decode_ab.py ${PASSES:-5} 2>&1 | grep -v Warning | tee "$out/decode.log"
elif [ "$part" = kernels ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_kernels_sm90.py --tb=short 2>&1 \
      | tail -30 > "$out/kernels.log"
  tail -n 3 "$out/kernels.log"
fi
