"""Decode's split count over a grid (call 6's ``splits_probe.py`` found the heuristic's 7 splits at b8 x 4,096 and
b8 x 8,192 6-7% slower than 4 or 8 for contiguous addressing): this tree's decode at every power-of-two split count up
to the tile count and at the heuristic's own (``num_kv_splits``), both addressings, beside SDPA cuDNN, at batch 1-128
x context 1,024 / 4,096 / 16,384. Per call of 20 calls in one CUDA graph (``kernels.bench.graph_us``), medians of
interleaved passes. Llama-3.1-8b attention shape, bf16, block 16, shuffled table. Writes ``splits_sweep.csv`` (one
row per shape, addressing and split count) to OUT.

python splits_sweep.py OUT [PASSES]
"""
from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_decode
from kernels.bench import Cache, graph_us, interleaved
from kernels.triton_common import sm_count

DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16


def time_counts(cache: Cache, q: torch.Tensor, candidates: list[int], passes: int) -> dict[tuple[str, int], float]:
    """Median graph time per call of our decode at each split count, both addressings, and of SDPA cuDNN (key
    ("sdpa_cudnn", 0)), over interleaved passes."""
    batch, ctx = cache.batch, cache.length
    timers = {}
    for name, addr, paged in (("contiguous", cache.seq_starts, False), ("paged", cache.block_table(BS), True)):
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
    return {k: statistics.median(v) for k, v in interleaved(timers, passes).items()}


def main() -> None:
    out, passes = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    config = triton_decode.decode_config(HD, DT, DEV)
    rows = []
    for ctx in (1024, 4096, 16384):
        for batch in (1, 2, 4, 8, 16, 32, 64, 128):
            cache = Cache(batch, ctx, DT, DEV)
            q = torch.randn(batch, HEADS, HD, dtype=DT, device=DEV)
            chosen = triton_decode.num_kv_splits(batch, 8, ctx, sm_count(DEV), config)
            tiles = ctx // config.block_n
            candidates = sorted({1 << k for k in range(tiles.bit_length()) if 1 << k <= min(tiles, 64)} | {chosen})
            times = time_counts(cache, q, candidates, passes)
            sdpa = times[("sdpa_cudnn", 0)]
            line = [f"b{batch:<3} x {ctx:<5} heuristic {chosen:2d}  sdpa {sdpa:7.1f}"]
            for name in ("contiguous", "paged"):
                best = min(candidates, key=lambda s: times[(name, s)])
                line.append(f"{name} {times[(name, chosen)]:7.1f} (x {sdpa / times[(name, chosen)]:.3f}) best {best:2d}: "
                            f"{times[(name, best)]:7.1f}")
                rows += [{"batch": batch, "context": ctx, "addressing": name, "splits": s, "heuristic": chosen,
                          "graph_us": times[(name, s)], "sdpa_cudnn_us": sdpa} for s in candidates]
            print("  ".join(line), flush=True)
            del cache
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "splits_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
