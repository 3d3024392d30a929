#!/usr/bin/env bash
# Issue 14 (vattention) on one H100: run from the repository root on the device machine, after
#   source .device_lite/install.sh; export PYTHONPATH=$PWD:$PYTHONPATH
# Part 1: the driver path's tests, the engines' GPU exactness tests, the VMM kernel timing.
# Part 2: throughput (3 repeats), memory_waste and a concurrency sweep, contiguous / vattention / paged.
set -u
part=${1:?part 1 or 2}
out=${OUT:-/tmp/out}
mkdir -p "$out/logs" "$out/runs"
log() { tee -a "$out/logs/part$part.log"; }
if [ "$part" = 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | log
  python -c "import torch, triton, transformers; from cuda.bindings import driver; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__); from engines.kv.cuda_vmm import granularity; print('VMM granularity', granularity(torch.device('cuda')))" 2>&1 | log
  python -m pytest -q -x tests/test_gpu_vattention.py 2>&1 | tail -5 | log
  python -m pytest -q -s tests/test_gpu_model.py -k "vattention or contiguous" 2>&1 | grep -E "requests equal|passed|failed|Error" | log
  python -m pytest -q tests/test_async_scheduling.py 2>&1 | tail -2 | log
  python -m kernels.bench --quick --sections vmm --out "$out/kernels" 2>&1 | tail -8 | log
fi
if [ "$part" = 2 ]; then
  python -m harness +experiment=throughput engine=contiguous,vattention,paged hydra.sweep.dir="$out/runs/throughput" 2>&1 | grep -E "ok in|failed|sweep:" | log
  tar -C "$out/runs" -czf "$out/throughput.tgz" throughput
  python -m harness +experiment=memory_waste hydra.sweep.dir="$out/runs/memory_waste" 2>&1 | grep -E "ok in|failed|sweep:" | log
  tar -C "$out/runs" -czf "$out/memory_waste.tgz" memory_waste
  # recorded: 1,16,128 (first touch) and 16,128 (premapped), each call under 10 minutes
  python -m harness +experiment=concurrency_sweep engine=contiguous,vattention,paged "arrival.concurrency=${CONC:-16,128}" \
    hydra.sweep.dir="$out/runs/concurrency_sweep" 2>&1 | grep -E "ok in|failed|sweep:" | log
  tar -C "$out/runs" -czf "$out/concurrency_sweep.tgz" concurrency_sweep
fi
