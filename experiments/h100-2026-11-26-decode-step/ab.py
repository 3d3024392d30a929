"""Old against new decode attention (run from either tree's root; prints tagged lines): graph-replay µs per call
of our decode kernel, paged and contiguous, beside SDPA cuDNN; an eager call's host µs; and the serve-shape decode
step's device time and kernel count (step_profile.decode_part).

python ab.py TAG
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_ops
from kernels.bench import HEAD_DIM, HEADS, Cache, graph_us

tag = sys.argv[1]
dev, dtype = torch.device("cuda"), torch.bfloat16
CASES = [(1, 512), (1, 4096), (8, 4096), (64, 512), (64, 4096), (1, 32768)]
HOST = [(1, 4096), (8, 4096)]


def host_us(fn, iters=1000) -> float:
    """Wall µs per call of a host-bound loop (the kernels are shorter than their launches)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / iters * 1e6


for b, ctx in CASES:
    cache = Cache(b, ctx, dtype, dev)
    q = torch.randn(b, HEADS, HEAD_DIM, dtype=dtype, device=dev)
    ops = {"paged": dict(block_tables=cache.block_table(16), block_size=16), "contiguous": dict(seq_starts=cache.seq_starts)}
    row = {}
    for name, addr in ops.items():
        fn = lambda addr=addr: triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, **addr,
                                                           max_seq_len=ctx, validate=False)
        row[name] = graph_us(fn, 20)
        if (b, ctx) in HOST:
            row[name + "_host"] = statistics.median(host_us(fn) for _ in range(3))
    q4 = q.view(b, 1, HEADS, HEAD_DIM).transpose(1, 2)
    k4, v4 = (x.view(b, ctx, x.shape[1], HEAD_DIM).transpose(1, 2) for x in (cache.k, cache.v))
    cudnn = lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["sdpa_cudnn"] = graph_us(cudnn, 20)
        if (b, ctx) in HOST:
            row["sdpa_cudnn_host"] = statistics.median(host_us(cudnn) for _ in range(3))
    print(f"AB {tag} b={b} ctx={ctx} " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    del cache

sys.path.insert(0, str(Path(__file__).parents[1] / "h100-2026-11-26-roofline"))  # step_profile.py
import step_profile  # noqa: E402

step_profile.decode_part(64, 600, 1, f"AB {tag} serve decode step (64 running, ~600 context, graph replay)")
