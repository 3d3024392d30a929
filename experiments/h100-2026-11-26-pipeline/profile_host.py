"""Where an eager call of our decode attention spends its host time (batch 1 x 4,096, llama-3.1-8b attention shape):
``python experiments/h100-2026-11-26-pipeline/profile_host.py``. Prints the eager wall time per call of our two
addressings and SDPA's, then cProfile's top functions over 2,000 calls of each of ours, and the same time per call
of the pieces: the checks, the split heuristic, the allocations, and each kernel launch alone."""

from __future__ import annotations

import cProfile
import io
import pstats

import torch

from kernels import triton_ops
from kernels.bench import HEAD_DIM, HEADS, Cache, eager_us


def main() -> None:
    dev = torch.device("cuda")
    cache = Cache(1, 4096, torch.bfloat16, dev)
    q = torch.randn(1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    calls = {
        "contiguous": lambda: triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, max_seq_len=4096,
                                                          validate=False, seq_starts=cache.seq_starts),
    }
    table = cache.block_table(16)
    calls["paged"] = lambda: triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, max_seq_len=4096,
                                                         validate=False, block_tables=table, block_size=16)
    dense_k = cache.k.view(1, 4096, 8, HEAD_DIM).transpose(1, 2).repeat_interleave(4, 1)
    dense_v = cache.v.view(1, 4096, 8, HEAD_DIM).transpose(1, 2).repeat_interleave(4, 1)
    qd = q.view(1, HEADS, 1, HEAD_DIM)
    calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(qd, dense_k, dense_v)
    calls["empty x3"] = lambda: (torch.empty((1, 32, 128), dtype=torch.bfloat16, device=dev),
                                 torch.empty((1, 32, 8, 128), dtype=torch.float32, device=dev),
                                 torch.empty((1, 32, 8), dtype=torch.float32, device=dev))
    for name, fn in calls.items():
        print(f"eager us/call {name}: {eager_us(fn, 2000):.1f}")
    for name in ("contiguous", "paged"):
        prof = cProfile.Profile()
        fn = calls[name]
        prof.enable()
        for _ in range(2000):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"--- {name}: top by own time (2,000 calls)")
        print(out.getvalue()[-6000:])


if __name__ == "__main__":
    main()
