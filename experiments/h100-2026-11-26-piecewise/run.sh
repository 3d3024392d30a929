#!/usr/bin/env bash
# Issue 13, fourth round (session 12): piecewise CUDA graphs for steps with prompt chunks (engines/piecewise_graphs.py).
# Usage on the GPU machine, from the repo root:  experiments/h100-2026-11-26-piecewise/run.sh OUT PART
#   PART tests:  the piecewise pieces against the eager forward, captured (bf16, fp32); every engine against
#                one-at-a-time greedy (piecewise graphs on by default, and one case with them off); the kernels'
#                GPU tests; asynchronous scheduling.
#   PART serve:  the serve workload offline (64 closed-loop clients, 512/128, seeds 0-2), piecewise graphs on and
#                off (engine.cuda_graph_max_tokens=0) alternating, twice each: both in one call, on one host.
#   PART throughput: `throughput` (contiguous, paged; 3 repeats), graphs on and off, one after the other.
#   PART seed_8b: `seed_8b` (contiguous, paged; 3 repeats), the head.
#   PART repeat: the repeated attention launches against the commit before (OLD): launch_ab.py, serve offline.
#   PART http:   the serve workload through `harness serve` + `harness bench-serve` (seeds 0-2), the head.
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
mkdir -p "$out"
runs=${RUNS:-/tmp/kvbench-runs}  # not under OUT: a run directory's name (`,` `=`) does not come back, a tarball does
serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
       workload.output.value=128 arrival=closed arrival.concurrency=64)
if [ "$part" = tests ]; then
  timeout 200 $py -m pytest -q -m gpu -s tests/test_piecewise_graphs.py 2>&1 | grep -E "relative|passed|failed|Error" | tail -8
  timeout 330 $py -m pytest -q -m gpu -s tests/test_gpu_model.py -k engines 2>&1 | grep -E "requests equal|passed|failed|Error" | tail -14
  timeout 150 $py -m pytest -q -m gpu tests/test_kernels_triton.py 2>&1 | tail -1
  timeout 150 $py -m pytest -q tests/test_async_scheduling.py 2>&1 | tail -1
elif [ "$part" = serve ]; then
  for pass in ${PASSES:-1 2}; do for mode in piecewise eager; do
    extra=(); [ $mode = eager ] && extra=(engine.cuda_graph_max_tokens=0)
    echo "### $mode, pass $pass"
    timeout 200 $py -m harness -m "${serve[@]}" "${extra[@]}" seed=0,1,2 reuse_engine=true name=offline64-$mode \
        report=false hydra.sweep.dir="$runs/serve/offline64-$mode-$pass" 2>&1 | grep -E "ok in|sweep:" | tail -4
  done; done
  tar czf "$out/serve.tgz" -C "$runs" serve
elif [ "$part" = throughput ] || [ "$part" = seed_8b ]; then
  extra=(); [ $part = seed_8b ] && extra=(model.source=random)
  modes=${MODES:-piecewise}
  for mode in $modes; do
    graphs=(); [ $mode = eager ] && graphs=(+engine_overrides.{contiguous,paged}.cuda_graph_max_tokens=0)
    echo "### $part, $mode"
    timeout ${SWEEP_TIMEOUT:-330} $py -m harness +experiment=$part engine=contiguous,paged repeats=3 report=false \
        name=$part-$mode hydra.sweep.dir="$runs/$part-$mode" "${extra[@]}" "${graphs[@]}" 2>&1 | grep -E "ok in|sweep:" | tail -7
  done
  tar czf "$out/$part.tgz" -C "$runs" $(cd "$runs" && ls -d $part-*)
elif [ "$part" = http ]; then  # as experiments/h100-2026-11-26-roofline/run.sh serve's second half
  $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 > "$out/serve_server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
  timeout 200 $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 --model qwen3-0.6b \
      --out "$runs/http/serve64" "${serve[@]}" seed=0,1,2 name=serve64 report=false 2>&1 | grep -E "ok in|sweep:" | tail -4
  curl -s http://127.0.0.1:8000/kvbench/info > "$out/serve_info_after.json"
  kill -TERM $server; wait $server
  tar czf "$out/http.tgz" -C "$runs" http
fi
if [ "$part" = repeat ]; then  # the repeated attention launches (HEAD) against the piecewise graphs without (OLD)
  base=${BASE_PYTHONPATH:?the PYTHONPATH without the repo}
  for side in new old; do
    root=$PWD; [ $side = old ] && root=$PWD/${OLD:?OLD=dir of the old tree}
    echo "### $side: launch_ab piecewise"
    PYTHONPATH=$root:$base timeout 150 $py experiments/h100-2026-11-26-piecewise/launch_ab.py piecewise 2>&1 | grep "^|"
  done
  for pass in 1 2; do for side in new old; do
    root=$PWD; [ $side = old ] && root=$PWD/$OLD
    echo "### serve offline, $side, pass $pass"
    PYTHONPATH=$root:$base timeout 120 $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true \
        name=offline64-$side report=false hydra.sweep.dir="$runs/repeat/offline64-$side-$pass" 2>&1 | grep -E "ok in|sweep:"
  done; done
  tar czf "$out/repeat.tgz" -C "$runs" repeat
fi
