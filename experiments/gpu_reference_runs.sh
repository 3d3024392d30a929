#!/usr/bin/env bash
# The reference runs recorded under experiments/, on one GPU. Usage: experiments/gpu_reference_runs.sh OUT PART
#   PART a: the `throughput` experiment (hf_paged, contiguous, paged), and the paged engine
#           served over HTTP (bench-serve, 64 closed-loop streams) beside the same workload offline
#   PART b: the `memory_waste` experiment at full size
# Each experiment's directory is packed as OUT/NAME.tgz.
set -uo pipefail
out=${1:?output directory}; part=${2:?part a or b}
py=${PYTHON:-python3}
mkdir -p "$out"
pack() { tar czf "$out/$1.tgz" -C "$out" "$1" && rm -rf "${out:?}/$1"; }
serve_workload=(model=qwen3-0.6b workload=fixed workload.num_requests=256 workload.prompt.value=512
                workload.output.value=128 arrival=closed arrival.concurrency=64)
if [ "$part" = a ]; then
  $py -m harness +experiment=throughput engine=hf_paged,contiguous,paged hydra.sweep.dir="$out/throughput"
  pack throughput
  $py -m harness engine=paged "${serve_workload[@]}" name=offline64 hydra.run.dir="$out/offline64"
  pack offline64
  $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 > "$out/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
  $py -m harness bench-serve --base-url http://127.0.0.1:8000 --model qwen3-0.6b --out "$out/serve64" \
      "${serve_workload[@]}" name=serve64
  kill -TERM $server; wait $server
  pack serve64
else
  $py -m harness +experiment=memory_waste hydra.sweep.dir="$out/memory_waste"
  pack memory_waste
fi
