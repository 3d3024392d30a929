"""Is decode's 3% behind SDPA cuDNN at b8 x 4,096 (graph replay) a matter of its split count? This tree's decode at
the heuristic's split count (``num_kv_splits``) and at others, both addressings, beside SDPA cuDNN, at six shapes:
per call of 20 calls in one CUDA graph (``kernels.bench.graph_us``, as the bench's graph column), medians of
interleaved passes. Llama-3.1-8b attention shape, bf16, block 16, shuffled table.

python splits_probe.py [PASSES]
"""
from __future__ import annotations

import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_decode
from kernels.bench import Cache, graph_us, interleaved
from kernels.triton_common import sm_count

DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16


def main() -> None:
    passes = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    config = triton_decode.decode_config(HD, DT, DEV)
    for batch, ctx in ((1, 4096), (4, 4096), (8, 4096), (16, 4096), (8, 8192), (64, 1024)):
        cache = Cache(batch, ctx, DT, DEV)
        q = torch.randn(batch, HEADS, HD, dtype=DT, device=DEV)
        chosen = triton_decode.num_kv_splits(batch, 8, ctx, sm_count(DEV), config)
        tiles = ctx // config.block_n
        candidates = sorted({s for s in (1, 2, 4, 6, 8, 12, 16, 24, 32, chosen - 1, chosen + 1, chosen) if 1 <= s <= tiles})
        timers = {}
        for name, addr, paged in (("contig", cache.seq_starts, False), ("paged", cache.block_table(BS), True)):
            for splits in candidates:
                fn = (lambda addr=addr, paged=paged, splits=splits: triton_decode.decode(
                    q, cache.k, cache.v, cache.seq_lens, addr, paged=paged, block_size=BS if paged else 1,
                    scale=HD ** -0.5, max_seq_len=ctx, num_splits=splits))
                timers[(name, splits)] = (lambda fn=fn: graph_us(fn, 20))
        k4, v4 = (x.view(batch, ctx, 8, HD).transpose(1, 2) for x in (cache.k, cache.v))
        q4 = q.view(batch, 1, HEADS, HD).transpose(1, 2)

        def sdpa_timer() -> float:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True), 20)
        timers[("sdpa_cudnn", 0)] = sdpa_timer
        times = {k: statistics.median(v) for k, v in interleaved(timers, passes).items()}
        sdpa = times[("sdpa_cudnn", 0)]
        print(f"\nb{batch} x {ctx}: heuristic {chosen} splits; SDPA cuDNN {sdpa:.1f} us")
        for name in ("contig", "paged"):
            row = "  ".join(f"{s}:{times[(name, s)]:.1f}" for s in candidates)
            best = min(candidates, key=lambda s: times[(name, s)])
            print(f"  {name:6} {row}")
            print(f"  {name:6} heuristic {times[(name, chosen)]:.1f} us (SDPA / it {sdpa / times[(name, chosen)]:.3f}); "
                  f"best {best} splits {times[(name, best)]:.1f} us (SDPA / it {sdpa / times[(name, best)]:.3f})")
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
