#!/usr/bin/env bash
# Issue 13, session 15: decode-sized linear layers that read their weight before the wait. On the GPU machine,
# from the repo root:
#   experiments/h100-2026-11-27-decode-gemm/run.sh OUT PART
#   PART probe: probe.py all (the tried kernel, tried/triton_linear_prefetch.py.txt, copied over
#               kernels/triton_linear.py for the run, against cuBLAS, alone and in a 28-layer decode chain)
#   PART tests: the GPU tests session 14 could not run (kernels, step anatomy, vattention, kernel peers)
#   PART check: the kernel GPU tests, step anatomy's, the engines' (test_gpu_model.py) and async scheduling's
#   PART ab:    ab.py (decode steps at 64/32/16/8 running, engine CUDA events): OLD (a git archive of the session's
#               start, 13df8ff), MID (one of 0e05464) and this tree, in the order SIDES (default "old new"), twice
#   PART heads: throughput and seed_8b (python -m harness +experiment=EXP engine=contiguous,paged repeats=3;
#               model.source=random for seed_8b), old then new
#   PART http:  this tree's serve workload offline, then through `harness serve` (two API processes,
#               server.api_server_count=2) + `harness bench-serve`, seeds 0-2 each, twice over
#   PART serve: the serve workload offline (qwen3-0.6b, 512/128, paged), 64 and 16 closed-loop clients, seeds 0-2,
#               old then new
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=$PWD/experiments/h100-2026-11-27-decode-gemm
mkdir -p "$out"
root_of() {  # old: the session's start (13df8ff); mid: the GEMM without the SwiGLU epilogue (0e05464); new: this tree
  case $1 in old) echo "${OLD:?OLD=dir of the old tree}";; mid) echo "${MID:?MID=dir of the mid tree}";; *) echo "$PWD";; esac
}
if [ "$part" = probe ]; then
  cp kernels/triton_linear.py "$out/kept_linear.py"
  cp $here/tried/triton_linear_prefetch.py.txt kernels/triton_linear.py
  (cd $here && timeout 300 $py probe.py all) 2>&1 | grep -v Warning | tee "$out/probe.log"
  mv "$out/kept_linear.py" kernels/triton_linear.py
elif [ "$part" = check ]; then
  timeout 150 $py -m pytest -q -m gpu tests/test_kernels_triton.py --tb=short 2>&1 | tail -40 > "$out/check_kernels.log"
  timeout 150 $py -m pytest -q -m gpu tests/test_step_anatomy.py tests/test_async_scheduling.py --tb=short 2>&1 \
      | tail -60 > "$out/check_anatomy_async.log"
  timeout 400 $py -m pytest -q -m gpu -s tests/test_gpu_model.py --tb=short 2>&1 \
      | grep -E "requests equal|agreeing|passed|failed|Error|assert" | tail -30 > "$out/check_model.log"
  tail -n 3 "$out"/check_*.log
elif [ "$part" = ab ]; then
  for pass in 1 2; do for side in ${SIDES:-old new}; do
    root=$(root_of $side)
    (cd "$root" && PYTHONPATH=$root:${PYTHONPATH:-} timeout 150 $py "$here/ab.py" "$side" 2>&1 \
        | grep -E "^AB|Error" | head -12)
  done; done | tee "$out/ab.log"
elif [ "$part" = serve ]; then
  for clients in 64 16; do
    serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=$((4 * clients)) workload.prompt.value=512
           workload.output.value=128 arrival=closed arrival.concurrency=$clients)
    for side in ${SIDES:-old new}; do
      root=$(root_of $side)
      (cd "$root" && PYTHONPATH=$root:${PYTHONPATH:-} timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 \
          reuse_engine=true name=offline${clients}_$side report=false \
          hydra.sweep.dir="$out/runs/offline${clients}_$side" 2>&1 | grep -v WARNING | tail -2)
    done
  done | tee "$out/serve.log"
  $py "$here/summarize.py" "$out/runs" | tee -a "$out/serve.log"
  tar czf "$out/serve_runs.tgz" -C "$out" runs && rm -rf "$out/runs"
elif [ "$part" = heads ]; then
  for exp in throughput seed_8b; do
    extra=(); [ $exp = seed_8b ] && extra=(model.source=random)
    for side in old new; do
      root=$(root_of $side)
      (cd "$root" && PYTHONPATH=$root:${PYTHONPATH:-} timeout 240 $py -m harness +experiment=$exp \
          engine=contiguous,paged repeats=3 report=false hydra.sweep.dir="$out/runs/${exp}_$side" "${extra[@]}" 2>&1 \
          | grep -v WARNING | tail -1)
    done
  done | tee "$out/heads.log"
  $py "$here/summarize.py" "$out/runs" | tee -a "$out/heads.log"
  tar czf "$out/heads_runs.tgz" -C "$out" runs && rm -rf "$out/runs"
elif [ "$part" = http ]; then
  serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
         workload.output.value=128 arrival=closed arrival.concurrency=64)
  for pass in 1 2; do
    timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true name=offline64_$pass report=false \
        hydra.sweep.dir="$out/runs/offline64_$pass" 2>&1 | grep -E "sweep:" | tail -1
    $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 server.api_server_count=2 \
        > "$out/server_$pass.log" 2>&1 &
    server=$!
    for _ in $(seq 240); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
    timeout 200 $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 --model qwen3-0.6b \
        --out "$out/runs/http64_$pass" "${serve[@]}" seed=0,1,2 name=http64_$pass report=false 2>&1 \
        | grep -E "sweep:" | tail -1
    kill -TERM $server; wait $server
  done | tee "$out/http.log"
  $py "$here/summarize.py" "$out/runs" | tee -a "$out/http.log"
  tar czf "$out/http_runs.tgz" -C "$out" runs && rm -rf "$out/runs" "$out"/server_*.log
elif [ "$part" = tests ]; then
  timeout 240 $py -m pytest -q -m gpu tests/test_kernels_triton.py 2>&1 | tail -3 | tee "$out/tests_kernels.log"
  timeout 240 $py -m pytest -q -m gpu tests/test_step_anatomy.py tests/test_gpu_vattention.py tests/test_kernel_peers.py \
      2>&1 | tail -5 | tee "$out/tests_other.log"
fi
