#!/usr/bin/env bash
# Issue 13, second round: asynchronous scheduling (engine.async_scheduling) against synchronous, both engines, one
# device call per comparison; the kernel peers in kernels.bench; the HTTP path against offline.
# Usage on the GPU machine, from the repo root: experiments/h100-2026-11-26-async/run.sh OUT PART
#   PART 1: GPU tests (async = sync token for token, every engine against one-at-a-time greedy, one host sync per
#           step, the kernel peers against ours), then `python -m kernels.bench --sections peers --quick`.
#   PART 2: `throughput` sync and async, repeats alternating (repeat r sync, then repeat r async).
#   PART 3: `seed_8b` (llama-3.1-8b shape, random weights) sync and async, repeats alternating.
#   PART 4: the serve workload (qwen3-0.6b, 64 closed-loop clients, prompt 512, output 128, paged) offline and
#           through `harness serve` + `harness bench-serve`, seeds 0-2 each (async, the default).
#   PART 5: the head of main, for the final figures: `throughput` and `seed_8b` (async, 3 repeats each), then part 4
#           (RUNS=... keeps them apart from the A/B runs).
#   PART 6: GPU tests: async = sync, logprobs against transformers (engine and server), every engine against
#           one-at-a-time greedy, one host sync per step, events time every step.
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
mkdir -p "$out"
runs=${RUNS:-$out/runs}
sweep() {  # mode(sync|async) experiment repeat [overrides...]
  local mode=$1 exp=$2 r=$3; shift 3
  local on=true; [ "$mode" = sync ] && on=false
  # engine_overrides: Hydra calls `engine=a,b engine.key=v` ambiguous outside -m, and -m checks keys against the
  # experiment's whole engine list (hf has no async_scheduling)
  timeout ${SWEEP_TIMEOUT:-240} $py -m harness +experiment=$exp engine=contiguous,paged name=${exp}_$mode \
      +engine_overrides.paged.async_scheduling=$on +engine_overrides.contiguous.async_scheduling=$on repeats=1 repeat=$r report=false hydra.sweep.dir="$runs/$exp/${mode}_r$r" "$@" \
      2>&1 | grep -v WARNING | tail -3
}
if [ "$part" = 1 ]; then
  $py -m pytest -q -x tests/test_async_scheduling.py tests/test_engines.py 2>&1 | tail -3
  $py -m pytest -q -m gpu tests/test_step_anatomy.py tests/test_gpu_model.py -k "anatomy or sync or warm or one_at_a_time" \
      2>&1 | tail -4
  $py -m pytest -q -m gpu tests/test_kernel_peers.py -k "not section" 2>&1 | tail -8
  timeout ${PEERS_TIMEOUT:-330} $py -m kernels.bench --sections peers --quick --out "$out/kernels" 2>&1 \
      | tee "$out/peers.log" | tail -45
elif [ "$part" = 2 ]; then
  for r in 0 1 2; do for m in sync async; do sweep $m throughput $r; done; done
  tar czf "$out/throughput.tgz" -C "$runs" throughput
elif [ "$part" = 3 ]; then
  for r in 0 1 2; do for m in sync async; do sweep $m seed_8b $r model.source=random; done; done
  tar czf "$out/seed_8b.tgz" -C "$runs" seed_8b
elif [ "$part" = 5 ]; then
  for r in 0 1 2; do sweep async throughput $r; done
  tar czf "$out/final_throughput.tgz" -C "$runs" throughput
  for r in 0 1 2; do sweep async seed_8b $r model.source=random; done
  tar czf "$out/final_seed_8b.tgz" -C "$runs" seed_8b
  "$0" "$out" 4
elif [ "$part" = 6 ]; then
  for t in tests/test_async_scheduling.py tests/test_logprobs.py tests/test_serve_logprobs.py; do
    timeout 120 $py -m pytest -q -x $t 2>&1 | tail -2
  done
  timeout 200 $py -m pytest -q -m gpu tests/test_step_anatomy.py tests/test_gpu_model.py \
      -k "anatomy or sync or warm or one_at_a_time" 2>&1 | tail -3
fi
if [ "$part" = 4 ]; then
  serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
         workload.output.value=128 arrival=closed arrival.concurrency=64)
  timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true name=offline64 report=false \
      hydra.sweep.dir="$runs/serve/offline64" 2>&1 | grep -v WARNING | tail -3
  $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 > "$out/serve_server.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
  curl -s http://127.0.0.1:8000/kvbench/info > "$out/serve_info_before.json"  # loop_seconds: the engine loop's phases
  timeout 200 $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 --model qwen3-0.6b \
      --out "$runs/serve/serve64" "${serve[@]}" seed=0,1,2 name=serve64 report=false 2>&1 | grep -v WARNING | tail -3
  curl -s http://127.0.0.1:8000/kvbench/info > "$out/serve_info_after.json"
  $py -c "import json,sys; a,b=(json.load(open(f))['loop_seconds'] for f in sys.argv[1:]); n=b.get('wall',0)-a.get('wall',0); \
print('engine loop during bench-serve:', {k: round(b[k]-a[k], 3) for k in b}, 'wall', round(n, 3))" \
      "$out/serve_info_before.json" "$out/serve_info_after.json"
  kill -TERM $server; wait $server
  tar czf "$out/serve.tgz" -C "$runs" serve
fi
