#!/bin/bash
# call 9: the HTTP path with two API processes (server.api_server_count=2) against one, on one GPU host
source .device_lite/install.sh >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device_lite/httptools/*.whl
export BASE_PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KVBENCH_CACHE=/tmp/kvcache OLD=/tmp/old PYTHONPATH=$PWD:/tmp/site
rm -rf /tmp/old && mkdir -p /tmp/old && git archive HEAD harness engines kernels conf benchmarks | tar x -C /tmp/old
R=/tmp/rec; rm -rf $R; mkdir -p $R
E=experiments/h100-2026-11-26-http/run.sh
SIDES="new new2" timeout 420 $E $R serve > $R/serve.log 2>&1; tail -40 $R/serve.log
API_SERVERS=2 timeout 120 $E $R http_path > $R/http_path2.log 2>&1; tail -22 $R/http_path2.log
tar czf $OUT/call9.tgz -C $R .
