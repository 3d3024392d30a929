#!/usr/bin/env bash
# Issue 13's first GPU evidence: the step anatomy, what it costs, and the host-sync fixes before/after.
# Usage on the GPU machine, from the repo root: experiments/h100-2026-11-26-anatomy/run.sh OUT PART
#   the code "before" (commit acadd34: anatomy, old host path) in .bench/before, "after" is the working tree.
#   PART 1: GPU tests of the anatomy and of one sync per step; the anatomy's cost (benchmarks/step_anatomy.py);
#           `throughput` (contiguous, paged) before and after, repeats alternating between the two.
#   PART 2: the anatomy's cost again, with the host's hottest functions; `throughput` before and after again.
#   PART 3: the anatomy's primitives and cost again; `seed_8b` (llama-3.1-8b shape, random weights) before and after.
#   PART 4: GPU tests (anatomy, one sync per step, warm-up, every engine against one-at-a-time greedy); the
#           primitives; the cost in three modes (on, off, host-only) with the host's hottest functions.
#   PART 5: the primitives and the cost (settings taking turns step by step); `throughput` before and after.
#   PART 6: `seed_8b` before and after, repeats alternating.
#   PART 7: where the HTTP path's time goes: the serve workload (qwen3-0.6b, 64 closed-loop clients, prompt 512,
#           output 128, paged) offline and through `harness serve` + `harness bench-serve`, seeds 0-2 each, with
#           the server's engine steps timed (the anatomy travels in its KV feed).
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
mkdir -p "$out"
runs=${RUNS:-$out/runs}
here=$PWD
sweep() {  # version experiment repeat [overrides...]
  local v=$1 exp=$2 r=$3; shift 3
  local code=$here; [ "$v" = before ] && code=$here/.bench/before
  (cd "$code" && PYTHONPATH=$code:${PYTHONPATH:-} $py -m harness +experiment=$exp engine=contiguous,paged name=${exp}_$v \
      repeats=1 repeat=$r report=false hydra.sweep.dir="$runs/$exp/${v}_r$r" "$@" 2>&1 | grep -v WARNING | tail -4)
}
if [ "$part" = 1 ]; then
  $py -m pytest -q -m gpu tests/test_step_anatomy.py 2>&1 | tail -4
  $py -m benchmarks.step_anatomy --running 8,64,256 --blocks 6 --block-steps 20 --out "$out/step_anatomy_cost.csv" \
      2>&1 | tee "$out/step_anatomy_cost.log" | tail -8
  for r in 0 1 2; do for v in before after; do sweep $v throughput $r; done; done
  tar czf "$out/throughput.tgz" -C "$runs" throughput
elif [ "$part" = 2 ]; then
  $py -m benchmarks.step_anatomy --running 8,256 --blocks 6 --block-steps 20 --profile 50 \
      --out "$out/step_anatomy_cost.csv" > "$out/step_anatomy_cost.log" 2>&1
  tail -6 "$out/step_anatomy_cost.log"
  for r in 0 1 2; do for v in before after; do sweep $v throughput $r; done; done
  tar czf "$out/throughput.tgz" -C "$runs" throughput
elif [ "$part" = 3 ]; then
  $py -m benchmarks.step_anatomy --primitives 2>&1 | tee "$out/primitives.log"
  $py -m benchmarks.step_anatomy --running 8,64,256 --blocks 6 --block-steps 20 --out "$out/step_anatomy_cost.csv" \
      > "$out/step_anatomy_cost.log" 2>&1
  tail -8 "$out/step_anatomy_cost.log"
  for r in 0 1 2; do for v in before after; do sweep $v seed_8b $r model.source=random; done; done
elif [ "$part" = 4 ]; then
  $py -m pytest -q -m gpu tests/test_step_anatomy.py tests/test_gpu_model.py -k "${TESTS:-anatomy or sync or warm or one_at_a_time}" \
      2>&1 | tail -4
  $py -m benchmarks.step_anatomy --primitives 2>&1 | tee "$out/primitives.log"
  $py -m benchmarks.step_anatomy --running 8,64,256 --blocks 6 --block-steps 20 --profile 30 \
      --out "$out/step_anatomy_cost.csv" > "$out/step_anatomy_cost.log" 2>&1
  tail -8 "$out/step_anatomy_cost.log"
elif [ "$part" = 5 ]; then
  $py -m benchmarks.step_anatomy --primitives 2>&1 | tee "$out/primitives.log"
  $py -m benchmarks.step_anatomy --running 8,64,256 --blocks 4 --block-steps 20 --out "$out/step_anatomy_cost.csv" \
      > "$out/step_anatomy_cost.log" 2>&1
  tail -8 "$out/step_anatomy_cost.log"
  for r in 0 1 2; do for v in before after; do sweep $v throughput $r; done; done
  tar czf "$out/throughput.tgz" -C "$runs" throughput
elif [ "$part" = 7 ]; then
  serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
         workload.output.value=128 arrival=closed arrival.concurrency=64)
  $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true name=offline64 report=false \
      hydra.sweep.dir="$runs/serve/offline64" 2>&1 | grep -v WARNING | tail -4
  $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 > "$out/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
  $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 --model qwen3-0.6b --out "$runs/serve/serve64" \
      "${serve[@]}" seed=0,1,2 name=serve64 report=false 2>&1 | grep -v WARNING | tail -4
  kill -TERM $server; wait $server
  tar czf "$out/serve.tgz" -C "$runs" serve
elif [ "$part" = 6 ]; then
  for r in 0 1 2; do for v in before after; do sweep $v seed_8b $r model.source=random; done; done
  tar czf "$out/seed_8b.tgz" -C "$runs" seed_8b
  tar czf "$out/seed_8b.tgz" -C "$runs" seed_8b
fi
