"""Is decode's 3% behind SDPA cuDNN at b8 x 4,096 (graph replay) a matter of its split count? This tree's decode at
the heuristic's split count (``num_kv_splits``) and at others, both addressings, beside SDPA cuDNN, at six shapes:
per call of 20 calls in one CUDA graph (``kernels.bench.graph_us``, as the bench's graph column), medians of
interleaved passes. Llama-3.1-8b attention shape, bf16, block 16, shuffled table.

python splits_probe.py [PASSES] (as call 6 ran it; its timing now shared with ``splits_sweep.py``)
"""
from __future__ import annotations

import sys

import torch
from splits_sweep import time_counts

from kernels import triton_decode
from kernels.bench import Cache
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
        times = {(k[0][:6] if k[0] == "contiguous" else k[0], k[1]): t
                 for k, t in time_counts(cache, q, candidates, passes).items()}
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
