#!/usr/bin/env bash
# The serve comparison after the one-pipeline change (issue 16), with the code before it (634b3f3) beside it in
# the same call, on one GPU. Usage: experiments/h100-2026-11-26-pipeline/run.sh OUT OLD_TGZ
#   1. the serve workload offline (qwen3-0.6b, paged, 64 closed-loop clients, prompt 512, output 128, 256
#      requests), one run per seed (SEEDS, default "0 1 2"), this code;
#   2. two servers up at once (this code on :8000, the old code on :8001, each engine with 20 GiB of KV cache),
#      then bench-serve against each in turn, seed by seed (new, old, new, old, ...), each with its own client
#      code: the HTTP path end to end, before and after, interleaved so that drift hits both.
# Every runs' folder is packed as OUT/NAME.tgz; reports are generated afterwards with `harness report`.
set -uo pipefail
out=${1:?output directory}; old_tgz=${2:?the old code as a .tgz}
py=${PYTHON:-python3}
mkdir -p "$out"; runs=/tmp/pipeline_runs; rm -rf "$runs"; mkdir -p "$runs"
old=/tmp/old_code; mkdir -p "$old" && tar xzf "$old_tgz" -C "$old"
seeds=${SEEDS:-0 1 2}  # one run per seed and path
kv=20  # GiB of KV cache for each engine: two servers share the GPU in step 2, and offline has the same capacity
model=${MODEL:-qwen3-0.6b}  # MODEL=tiny-qwen3 REQUESTS=16 for a smoke run on a CPU
serve=(model=$model engine=paged workload=fixed workload.num_requests=${REQUESTS:-256} workload.prompt.value=512
       workload.output.value=128 arrival=closed arrival.concurrency=64)
$py -m harness -m "${serve[@]}" engine.kv_budget_gb=$kv seed=$(echo $seeds | tr " " ,) reuse_engine=true name=offline64 \
    report=false hydra.sweep.dir="$runs/offline64" 2>&1 | grep -v WARNING | tail -3
start() {  # $1 code root, $2 port
  (cd "$1" && PYTHONPATH="$1:${PYTHONPATH:-}" $py -m harness serve model=$model engine=paged \
      engine.kv_budget_gb=$kv server.port=$2 > "$out/server_$2.log" 2>&1 &)
}
start "$PWD" 8000
for _ in $(seq 240); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
start "$old" 8001
for _ in $(seq 240); do curl -sf http://127.0.0.1:8001/health > /dev/null && break; sleep 1; done
curl -sf http://127.0.0.1:8001/health > /dev/null || { echo "old server did not start"; tail -20 "$out/server_8001.log"; }
for seed in $seeds; do
  $py -m harness bench-serve --base-url http://127.0.0.1:8000 --model $model --out "$runs/serve64_new/$seed" \
      "${serve[@]}" seed=$seed name=serve64_new report=false 2>&1 | grep -v WARNING | tail -2
  (cd "$old" && PYTHONPATH="$old:${PYTHONPATH:-}" $py -m harness bench-serve --base-url http://127.0.0.1:8001 \
      --model $model --out "$runs/serve64_old/$seed" "${serve[@]}" seed=$seed name=serve64_old report=false \
      2>&1 | grep -v WARNING | tail -2)
done
curl -s http://127.0.0.1:8000/kvbench/info > "$out/info_new.json"; curl -s http://127.0.0.1:8001/kvbench/info > "$out/info_old.json"
pkill -TERM -f "harness serve" ; sleep 5
tar czf "$out/runs.tgz" -C "$runs" offline64 serve64_new serve64_old
