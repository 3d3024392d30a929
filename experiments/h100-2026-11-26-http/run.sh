#!/usr/bin/env bash
# Issue 13, the HTTP path (session 13): the serve workload offline and through `harness serve` + `harness bench-serve`,
# this tree (NEW) against the session's starting commit (OLD, server and client both), on one GPU host.
# Usage on the GPU machine, from the repo root:  experiments/h100-2026-11-26-http/run.sh OUT PART
#   PART http_path: benchmarks/http_path.py (a synthetic engine: the host's share alone), OLD's server and NEW's.
#   PART serve:     offline (NEW), then HTTP NEW and HTTP OLD, alternating, PASSES times (seeds 0-2 each); the API
#                   process's CPU seconds per output token and the engine loop's split (/kvbench/info) after each.
# Needs OLD (a directory holding the old tree's harness, engines, kernels, conf, benchmarks) and BASE_PYTHONPATH
# (the PYTHONPATH without the repo).
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
mkdir -p "$out"
runs=${RUNS:-/tmp/kvbench-runs}  # not under OUT: a run directory's name (`,` `=`) does not come back, a tarball does
base=${BASE_PYTHONPATH:?the PYTHONPATH without the repo}
old=${OLD:?OLD=dir of the old tree}
serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
       workload.output.value=128 arrival=closed arrival.concurrency=64)
cpu_s() { awk '{print ($14 + $15) / 100}' /proc/$1/stat; }  # utime + stime, in clock ticks of 1/100 s
if [ "$part" = http_path ]; then
  PYTHONPATH=$PWD:$base timeout 300 $py -m benchmarks.http_path --device-ms 2.75 --repeats ${REPEATS:-2} --server-root "$old" \
      --server-root . --out "$out/http_path.json" 2>&1 | grep -v "HTTP Request" | tail -24
elif [ "$part" = serve ]; then
  PYTHONPATH=$PWD:$base timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true name=offline64 \
      report=false hydra.sweep.dir="$runs/serve/offline64" 2>&1 | grep -E "ok in|sweep:" | tail -4
  for pass in ${PASSES:-1 2}; do for side in new old; do
    root=$PWD; [ $side = old ] && root=$old
    echo "### HTTP, $side, pass $pass"
    PYTHONPATH=$root:$base $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 \
        > "$out/server_${side}_$pass.log" 2>&1 &
    server=$!
    for _ in $(seq 240); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
    before=$(cpu_s $server)
    PYTHONPATH=$root:$base timeout 200 $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 \
        --model qwen3-0.6b --out "$runs/serve/http64-$side-$pass" "${serve[@]}" seed=0,1,2 name=http64-$side \
        report=false 2>&1 | grep -E "ok in|sweep:" | tail -4
    after=$(cpu_s $server)
    echo "API process CPU during the sweep: $before -> $after s"
    curl -s http://127.0.0.1:8000/kvbench/info > "$out/info_${side}_$pass.json"
    kill -TERM $server; wait $server
  done; done
  tar czf "$out/serve.tgz" -C "$runs" serve
fi
