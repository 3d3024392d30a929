#!/bin/bash
# call 10: experiments/gpu_reference_runs.sh serve (offline, offline with text, HTTP: one API process, two, thread)
source .device_lite/install.sh >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device_lite/httptools/*.whl
export PYTHONUNBUFFERED=1 KVBENCH_CACHE=/tmp/kvcache PYTHONPATH=$PWD:/tmp/site
R=/tmp/ref; rm -rf $R; mkdir -p $R
timeout 560 bash experiments/gpu_reference_runs.sh $R serve > $R/serve_part.log 2>&1; echo "rc=$?"
grep -E "ok in|sweep:" $R/serve_part.log | tail -30
for m in process processes thread; do echo "$m: $(cat $R/serve64_$m/cpu.json 2>/dev/null | head -c 300)"; done
tar czf $OUT/call10.tgz -C $R .
