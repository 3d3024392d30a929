#!/usr/bin/env bash
# Issue 13, session 14: programmatic dependent launch for our kernels (and two tries left out). On the GPU machine,
# from the repo root:
#   experiments/h100-2026-11-26-decode-step/run.sh OUT PART
#   PART probe: tried/triton_linear.py.txt (copied to kernels/ for the run) against cuBLAS (probe.py all)
#   PART tests: the kernel GPU tests, then the engine cases of test_gpu_model.py (ENGINE_CASES: a -k filter)
#   PART ab:    ab.py (decode kernels, graph replays and eager host cost; the serve decode step's kernels):
#               OLD (a git archive of the session's start, e0be00e) and this tree, old, new, old, new
#   PART ab2:   ab2.py (decode and prefill steps, by the engine's CUDA events): old, new, old, new
#   PART serve: the serve workload offline, seeds 0-2 on one engine, old then new
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=$PWD/experiments/h100-2026-11-26-decode-step
mkdir -p "$out"
root_of() { if [ "$1" = old ]; then echo "${OLD:?OLD=dir of the old tree}"; else echo "$PWD"; fi; }
if [ "$part" = probe ]; then
  cp $here/tried/triton_linear.py.txt kernels/triton_linear.py
  (cd $here && timeout 560 $py probe.py all) 2>&1 | tee "$out/probe.log"
  rm kernels/triton_linear.py
elif [ "$part" = tests ]; then
  timeout 200 $py -m pytest -q -m gpu tests/test_kernels_triton.py 2>&1 | tail -3
  timeout 300 $py -m pytest -q -m gpu -s tests/test_gpu_model.py -k "${ENGINE_CASES:-engines_match}" 2>&1 \
      | grep -E "requests equal|passed|failed|Error" | tail -20
elif [ "$part" = ab ] || [ "$part" = ab2 ]; then
  for pass in 1 2; do for side in old new; do
    root=$(root_of $side)
    (cd "$root" && PYTHONPATH=$root:${PYTHONPATH:-} timeout 150 $py "$here/$part.py" "$side" 2>&1 \
        | grep -E "^AB|^## |attention |Error" | head -12)
  done; done
elif [ "$part" = serve ]; then
  serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
         workload.output.value=128 arrival=closed arrival.concurrency=64)
  for side in ${SIDES:-old new}; do
    root=$(root_of $side)
    (cd "$root" && PYTHONPATH=$root:${PYTHONPATH:-} timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 \
        reuse_engine=true name=offline64_$side report=false hydra.sweep.dir="$out/runs/offline64_$side" 2>&1 \
        | grep -v WARNING | tail -2)
  done
  $py "$here/summarize.py" "$out/runs"
fi
