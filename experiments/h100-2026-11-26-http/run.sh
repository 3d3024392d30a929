#!/usr/bin/env bash
# Issue 13, the HTTP path (session 13): the serve workload offline and through `harness serve` + `harness bench-serve`,
# this tree (NEW) against the session's starting commit (OLD, server and client both), on one GPU host.
# Usage on the GPU machine, from the repo root:  experiments/h100-2026-11-26-http/run.sh OUT PART
#   PART http_path: benchmarks/http_path.py (a synthetic engine: the host's share alone), OLD's server and NEW's.
#   PART serve:     offline (NEW), then HTTP for each of SIDES (default "new old"; new2: NEW with two API
#                   processes, server.api_server_count=2), alternating, PASSES times (seeds 0-2 each); the API
#                   processes' CPU seconds during each sweep and the engine loop's split (/kvbench/info) after it.
#   PART http_path also takes API_SERVERS (server.api_server_count of its servers).
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
# CPU seconds of a server's API processes: the launcher and its children but the engine process
api_cpu_s() { $py -c "import psutil, sys; p = psutil.Process($1); ps = [p] + [c for c in p.children() if c.pid != $2]
print(round(sum(t.user + t.system for t in (q.cpu_times() for q in ps)), 2))"; }
if [ "$part" = http_path ]; then
  PYTHONPATH=$PWD:$base timeout 300 $py -m benchmarks.http_path --device-ms 2.75 --repeats ${REPEATS:-2} \
      --api-server-count ${API_SERVERS:-1} $([ ${API_SERVERS:-1} = 1 ] && echo --server-root "$old") --server-root . \
      --out "$out/http_path${API_SERVERS:-1}.json" 2>&1 | grep -v "HTTP Request" | tail -24
elif [ "$part" = serve ]; then
  PYTHONPATH=$PWD:$base timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true name=offline64 \
      report=false hydra.sweep.dir="$runs/serve/offline64-${OFFLINE_TAG:-1}" 2>&1 | grep -E "ok in|sweep:" | tail -4
  for pass in ${PASSES:-1 2}; do for side in ${SIDES:-new old}; do
    root=$PWD; [ $side = old ] && root=$old
    count=1; [ $side = new2 ] && count=2  # new2: this tree with two API processes
    echo "### HTTP, $side, pass $pass"
    PYTHONPATH=$root:$base $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 \
        $([ $count -gt 1 ] && echo server.api_server_count=$count) > "$out/server_${side}_$pass.log" 2>&1 &
    server=$!
    for _ in $(seq 240); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
    engine=$(curl -s http://127.0.0.1:8000/kvbench/info | $py -c "import json, sys; print(json.load(sys.stdin)['engine_pid'])")
    before=$(api_cpu_s $server $engine)
    PYTHONPATH=$root:$base timeout 200 $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 \
        --model qwen3-0.6b --out "$runs/serve/http64-$side-$pass" "${serve[@]}" seed=0,1,2 name=http64-$side \
        report=false 2>&1 | grep -E "ok in|sweep:" | tail -4
    after=$(api_cpu_s $server $engine)
    echo "API processes' CPU during the sweep: $before -> $after s"
    curl -s http://127.0.0.1:8000/kvbench/info > "$out/info_${side}_$pass.json"
    kill -TERM $server; wait $server
  done; done
  tar czf "$out/serve.tgz" -C "$runs" serve
fi
