"""Our prefill kernel (and decode's split kernel) compiled for sm_90 on the CPU (Triton's bundled ptxas and nvdisasm), old (``kernels_old``,
OLD=its folder) and new, both addressings, the engines' two tiles: shared memory, SASS instructions in all and in
the unmasked K/V loop (the first loop that branches back over more than 100 instructions). Constexprs and options
as the wrappers pass them on an H100 (``tests/test_kernels_sm90.py`` records them the same way).

OLD=... python sass_counts.py   (run it once per Triton: the log has 3.6.0 and 3.7.1)
"""
from __future__ import annotations

import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.environ["OLD"])
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
INSTR = re.compile(r"/\*[0-9a-f]{4,6}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def compiled(module, paged: bool, length: int):
    """The prefill kernel (a ``triton_prefill`` module) or decode's split kernel (a ``triton_decode`` one)."""
    recorded = []
    module.launch = lambda fn, grid, *args, **kwargs: recorded.append((fn, args, kwargs))
    k = torch.empty(2 * length, 8, 128, dtype=torch.bfloat16)
    addr = torch.zeros(2, length // 16, dtype=torch.int32) if paged else torch.zeros(2, dtype=torch.int32)
    lens = torch.full((2,), length, dtype=torch.int32)
    cuda = torch.device("cuda")
    if hasattr(module, "prefill"):
        q = torch.empty(2 * length, 32, 128, dtype=torch.bfloat16)
        config = module.prefill_config(128, torch.bfloat16, cuda, length)
        module.prefill(q, k, k, torch.arange(3, dtype=torch.int32) * length, lens, addr, paged=paged,
                       block_size=16 if paged else 1, scale=0.1, max_query_len=length, max_seq_len=length,
                       config=config)
    else:
        config = module.decode_config(128, torch.bfloat16, cuda)
        module.decode(torch.empty(2, 32, 128, dtype=torch.bfloat16), k, k, lens, addr, paged=paged,
                      block_size=16 if paged else 1, scale=0.1, max_seq_len=length, num_splits=4, config=config)
    fn, args, kwargs = recorded[0]
    names = list(fn.arg_names)
    options = ("num_warps", "num_stages", "launch_pdl")
    constexprs = {key: v for key, v in kwargs.items() if key not in options} | {"PDL": True, "UPCAST": False}
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = {torch.bfloat16: "*bf16", torch.int32: "*i32", torch.float32: "*fp32"}[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
            if isinstance(value, int) and value and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature |= {name: "constexpr" for name in names if name in constexprs}
    opts = {key: kwargs[key] for key in options if key in kwargs} | {"launch_pdl": True}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=opts), config


def counts(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    total = sum(1 for line in lines if INSTR.search(line))
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            n = sum(1 for x in lines[labels[m.group(1)]:i + 1] if INSTR.search(x))
            if n > 100:
                return total, n
    return total, 0


def main() -> None:
    print(f"triton {triton.__version__}")
    for side, name in (("old", "kernels_old.triton_prefill"), ("new", "kernels.triton_prefill")):
        module = importlib.import_module(name)
        for length in (512, 4096):
            for paged in (False, True):
                kernel, config = compiled(module, paged, length)
                total, loop = counts(kernel.asm["cubin"])
                print(f"{side} prefill {config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages} "
                      f"{'paged' if paged else 'contiguous':10} Triton num_stages {kernel.metadata.num_stages}: "
                      f"shared {kernel.metadata.shared:7,} B, SASS {total:5,} instructions, unmasked loop {loop}")
    for side, name in (("old", "kernels_old.triton_decode"), ("new", "kernels.triton_decode")):
        module = importlib.import_module(name)
        for paged in (False, True):
            kernel, config = compiled(module, paged, 4096)
            total, loop = counts(kernel.asm["cubin"])
            print(f"{side} decode split, block_n {config.block_n} w{config.num_warps} s{config.num_stages} "
                  f"{'paged' if paged else 'contiguous':10}: shared {kernel.metadata.shared:7,} B, SASS {total:5,} "
                  f"instructions, K/V loop {loop}")


if __name__ == "__main__":
    main()
