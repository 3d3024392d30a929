"""Decode split heuristics at the peers' shapes, as the peers section times them (``graph_us``: 20 calls in one
CUDA graph) beside SDPA cuDNN: the default config, then waves x min_tiles_per_split, and num_stages 3, paged 16 and
contiguous. Prints us per call and the best config per shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.bench import HEAD_DIM, HEADS, KV_HEADS, Cache, graph_us
from kernels.triton_common import sm_count
from kernels.triton_decode import DecodeConfig, decode, num_kv_splits

dev, dtype = torch.device("cuda"), torch.bfloat16
CONFIGS = [DecodeConfig(64, 4, 2)] + [DecodeConfig(64, 4, 2, waves=w, min_tiles_per_split=m)
                                      for w in (2, 4, 6, 8) for m in (1, 2, 4)] + [DecodeConfig(64, 4, 3)]
for batch, context in ((8, 4096), (1, 4096), (1, 32768), (64, 512), (64, 4096), (1, 512)):
    cache = Cache(batch, context, dtype, dev)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=dev)
    k = cache.k.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = cache.v.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q4 = q.view(batch, 1, HEADS, HEAD_DIM).transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref_us = min(graph_us(sdpa, 20) for _ in range(3))
    print(f"b{batch} x {context}: sdpa_cudnn {ref_us:.1f} us")
    for paged in (True, False):
        addr = cache.block_table(16) if paged else cache.seq_starts
        expected = decode(q, cache.k, cache.v, cache.seq_lens, addr, paged=paged, block_size=16,
                          scale=HEAD_DIM**-0.5, max_seq_len=context)
        rows = []
        for cfg in CONFIGS:
            run = lambda cfg=cfg: decode(q, cache.k, cache.v, cache.seq_lens, addr, paged=paged,  # noqa: E731
                                         block_size=16, scale=HEAD_DIM**-0.5, max_seq_len=context, config=cfg)
            err = ((run().float() - expected.float()).norm() / expected.float().norm()).item()
            t = min(graph_us(run, 20) for _ in range(3)) if err < 1e-2 else float("nan")
            splits = num_kv_splits(batch, KV_HEADS, context, sm_count(dev), cfg)
            rows.append((t, f"w{cfg.waves}/m{cfg.min_tiles_per_split}/s{cfg.num_stages}:{splits}"))
        line = "  ".join(f"{name}={t:.1f}" for t, name in rows)
        best = min(rows)
        print(f"  {'paged' if paged else 'contig'}: default {rows[0][0]:.1f}, best {best[1]} {best[0]:.1f} "
              f"(peer/best {ref_us / best[0]:.3f}, peer/default {ref_us / rows[0][0]:.3f})\n    {line}", flush=True)
    del cache, k, v
