"""Decode's split count, timed two ways (issue 13, session 18). Session 17's sweep (``h100-2026-11-27-launch/
splits_sweep.py``) timed 20 back-to-back calls in one CUDA graph: a cache under L2's 50 MB is then read from L2 after
the first call, which an engine's step never does (every other layer's weights and cache pass through L2 between two
reads of one layer's cache). This sweep times every power-of-two split count (up to the tile count and 64) both
ways, "hot" (``kernels.bench.graph_us``, 20 calls) and "cold" (``kernels.bench.time_us``: one call, L2 flushed
before each), both addressings, beside SDPA cuDNN timed the same two ways, at batch 1-128 x context 1,024 / 4,096 /
16,384. Llama-3.1-8b attention shape, bf16, block 16, shuffled table; medians of interleaved passes. Writes
``splits_cold.csv`` (one row per shape, addressing, split count and mode) to OUT.

python splits_cold.py OUT [PASSES]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_decode
from kernels.bench import Cache, graph_us, interleaved, time_us
from kernels.triton_common import sm_count

DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16
MODES = {"hot": lambda fn: graph_us(fn, 20), "cold": lambda fn: time_us(fn, 40)}


def timers_for(cache: Cache, q: torch.Tensor, counts: list[int]) -> dict[tuple[str, int, str], object]:
    """A timer per (addressing, split count, mode), and SDPA cuDNN's per mode (addressing "sdpa_cudnn", count 0)."""
    batch, ctx = cache.batch, cache.length
    timers = {}
    for name, addr, paged in (("contiguous", cache.seq_starts, False), ("paged", cache.block_table(BS), True)):
        for splits in counts:
            fn = (lambda addr=addr, paged=paged, splits=splits: triton_decode.decode(
                q, cache.k, cache.v, cache.seq_lens, addr, paged=paged, block_size=BS if paged else 1,
                scale=HD ** -0.5, max_seq_len=ctx, num_splits=splits))
            for mode, timer in MODES.items():
                timers[(name, splits, mode)] = (lambda fn=fn, timer=timer: timer(fn))
    k4, v4 = (x.view(batch, ctx, 8, HD).transpose(1, 2) for x in (cache.k, cache.v))
    q4 = q.view(batch, 1, HEADS, HD).transpose(1, 2)

    def sdpa(timer) -> float:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return timer(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True))
    for mode, timer in MODES.items():
        timers[("sdpa_cudnn", 0, mode)] = (lambda timer=timer: sdpa(timer))
    return timers


def main() -> None:
    out, passes = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    config = triton_decode.decode_config(HD, DT, DEV)
    rows = []
    for ctx in (1024, 4096, 16384):
        for batch in (1, 2, 4, 8, 16, 32, 64, 128):
            cache = Cache(batch, ctx, DT, DEV)
            q = torch.randn(batch, HEADS, HD, dtype=DT, device=DEV)
            chosen = triton_decode.num_kv_splits(batch, 8, ctx, sm_count(DEV), config)
            tiles = ctx // config.block_n
            counts = [1 << k for k in range(tiles.bit_length()) if 1 << k <= min(tiles, 64)]
            times = {k: statistics.median(v) for k, v in interleaved(timers_for(cache, q, counts), passes).items()}
            line = [f"b{batch:<3} x {ctx:<5} rule {chosen:2d}"]
            for mode in MODES:
                sdpa = times[("sdpa_cudnn", 0, mode)]
                line.append(f"{mode}: sdpa {sdpa:7.1f}")
                for name in ("contiguous", "paged"):
                    best = min(counts, key=lambda s: times[(name, s, mode)])
                    line.append(f"{name[0]} {times[(name, chosen, mode)]:7.1f} best {best:2d} {times[(name, best, mode)]:7.1f}")
                    rows += [{"batch": batch, "context": ctx, "addressing": name, "splits": s, "rule": chosen,
                              "mode": mode, "us": times[(name, s, mode)], "sdpa_cudnn_us": sdpa} for s in counts]
            print("  ".join(line), flush=True)
            del cache
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "splits_cold.csv", index=False)


if __name__ == "__main__":
    main()
