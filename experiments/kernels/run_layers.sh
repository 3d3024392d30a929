#!/usr/bin/env bash
# The elementwise-layer kernels on a GPU: their GPU tests (errors printed), the kernels one
# decoder layer launches with each backend, the floor of one graph-replayed kernel, and the
# layers section of the benchmark. Usage, from the repo root: experiments/kernels/run_layers.sh OUT_DIR
set -uo pipefail
out="${1:?output folder}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv >"$out/gpu.txt"
python3 -c "import torch, triton, sys; print(torch.__version__, torch.version.cuda, triton.__version__, sys.version.split()[0])" >>"$out/gpu.txt"
python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_kernels_triton.py \
  -k "rms_norm or silu or rotary or layers or tiny_qwen3" 2>&1 | tee "$out/layers_tests.log" | tail -4
python3 - <<'PY' 2>&1 | tee "$out/layers_launches.log"
import torch
from torch.profiler import ProfilerActivity, profile
from kernels import reference, triton_ops
from kernels.bench import LAYER_SHAPES, PER_LAYER, layer_problems, time_us

problems = layer_problems(LAYER_SHAPES[0], 256, torch.bfloat16, torch.device("cuda"))
for name, ops in (("torch", reference), ("triton", triton_ops)):
    def layer():
        for op, count in PER_LAYER.items():
            for _ in range(count):
                getattr(ops, op)(*problems[op][0])
    layer()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{LAYER_SHAPES[0].name} T=256, one decoder layer's elementwise ops ({name}): {len(kernels)} kernels")
x = torch.empty(1, device="cuda")
print(f"floor: one graph-replayed 1-element fill kernel {time_us(x.zero_, 200):.1f} us")
PY
python3 -m kernels.bench --sections layers --out "$out" 2>&1 | tee "$out/layers_bench.log" | tail -22
