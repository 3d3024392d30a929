#!/bin/bash
# call 8: the HTTP path, OLD (session start) vs NEW, with httptools (as requirements.lock installs uvicorn)
source .device_lite/install.sh >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device_lite/httptools/*.whl
export BASE_PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KVBENCH_CACHE=/tmp/kvcache OLD=/tmp/old
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import httptools, uvicorn, uvloop; print('httptools', httptools.__version__, 'uvicorn', uvicorn.__version__, 'uvloop', uvloop.__version__)"
nproc; grep -m1 "model name" /proc/cpuinfo; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rm -rf /tmp/old && mkdir -p /tmp/old && git archive HEAD harness engines kernels conf benchmarks | tar x -C /tmp/old
git log -1 --format=%h
E=experiments/h100-2026-11-26-http/run.sh
$E $OUT http_path 2>&1 | tee $OUT/http_path.log
$E $OUT serve 2>&1 | tee $OUT/serve.log
