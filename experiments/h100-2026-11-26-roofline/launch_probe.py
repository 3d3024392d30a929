"""Where an eager decode call's host time goes (batch 1 x 4,096, bf16, paged 16): the public op, the launch
function without checks, Triton's launch path (``kernel[grid](...)``) for the two kernels, and the compiled
kernels' own launcher called directly. Prints Triton's ``JITFunction.run`` source last (the launcher's
argument order for this Triton version)."""

from __future__ import annotations

import inspect
import time

import torch
import triton
from triton.runtime import jit

from kernels import triton_decode, triton_ops
from kernels.bench import HEAD_DIM, HEADS, Cache

dev, dtype = torch.device("cuda"), torch.bfloat16
cache = Cache(1, 4096, dtype, dev)
table = cache.block_table(16)
q = torch.randn(1, HEADS, HEAD_DIM, dtype=dtype, device=dev)


def per_call_us(fn, iters=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / iters * 1e6


def op():
    return triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, block_tables=table, block_size=16,
                                       max_seq_len=4096, validate=False)


def launch_fn():
    return triton_decode.decode(q, cache.k, cache.v, cache.seq_lens, table, paged=True, block_size=16,
                                scale=HEAD_DIM**-0.5, max_seq_len=4096)


rows = {"public op (validate=False)": per_call_us(op), "triton_decode.decode (no checks)": per_call_us(launch_fn)}

# capture the two kernels' arguments by wrapping JITFunction.run once
captured = []
orig = jit.JITFunction.run


def spy(self, *args, grid, warmup, **kwargs):
    kernel = orig(self, *args, grid=grid, warmup=warmup, **kwargs)
    captured.append((self, args, grid, kwargs, kernel))
    return kernel


jit.JITFunction.run = spy
launch_fn()
jit.JITFunction.run = orig
torch.cuda.synchronize()
print("kernels in one call:", [c[0].fn.__name__ for c in captured], "grids:", [c[2] for c in captured])
for fn, args, grid, kwargs, kernel in captured:
    rows[f"{fn.fn.__name__}[grid](...)"] = per_call_us(lambda: fn[grid](*args, **kwargs))
    stream = torch.cuda.current_stream().cuda_stream
    # the launcher takes every argument, constexprs included, as JITFunction.run passes them
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    values = list(bound.arguments.values())
    g = tuple(grid) + (1,) * (3 - len(grid))

    def direct(kernel=kernel, values=values, g=g):
        kernel.run(g[0], g[1], g[2], torch.cuda.current_stream().cuda_stream, kernel.function,
                   kernel.packed_metadata, None, None, None, *values)

    try:
        direct()
        torch.cuda.synchronize()
        rows[f"{fn.fn.__name__} compiled.run direct"] = per_call_us(direct)
    except Exception as exc:  # the launcher's signature differs in this version
        print(f"direct launch failed: {type(exc).__name__}: {exc}")
    rows[f"  torch.cuda.current_stream().cuda_stream"] = per_call_us(lambda: torch.cuda.current_stream().cuda_stream)

out = op()
ref = torch.empty_like(out)
print("\n## eager host cost per call (us)")
for k, v in rows.items():
    print(f"  {k:45s} {v:7.2f}")
print("\ntriton", triton.__version__)
src = inspect.getsource(jit.JITFunction.run)
print(src[-2500:])
