#!/usr/bin/env bash
# Issue 13, session 16: the prefill kernel's paged addressing. On the GPU machine, from the repo root:
#   experiments/h100-2026-11-27-prefill/run.sh OUT PART
#   PART check: the GPU tests session 15's review mends never ran on (the kernels', and the replayed bf16 decode
#               step against eager)
#   PART probe: probe.py (the prefill kernel of the session's start, OLD=dir with kernels_old, against this tree's
#               and the peers), PASSES passes (default 3); VARIANTS=1: call 2's variants/ instead of OLD
#   PART tune:  probe.py tune (tile configurations of this tree's kernel)
#   PART kernels: the kernel GPU tests on this tree
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=$PWD/experiments/h100-2026-11-27-prefill
mkdir -p "$out"
if [ "$part" = check ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py --tb=short 2>&1 | tail -30 > "$out/check_kernels.log"
  timeout 150 $py -m pytest -q -m gpu -s tests/test_gpu_model.py -k decode_step_replayed --tb=short 2>&1 \
      | tail -15 > "$out/check_model.log"
  tail -n 3 "$out"/check_*.log
elif [ "$part" = probe ]; then
  timeout 420 $py $here/probe.py ${PASSES:-3} ${VARIANTS:+variants} 2>&1 | grep -v Warning | tee "$out/probe.log"
elif [ "$part" = tune ]; then
  timeout 300 $py $here/probe.py ${PASSES:-3} tune 2>&1 | grep -v Warning | tee "$out/tune.log"
elif [ "$part" = kernels ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_kernels_sm90.py --tb=short 2>&1 \
      | tail -30 > "$out/kernels.log"
  tail -n 3 "$out/kernels.log"
fi
