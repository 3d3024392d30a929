"""Decode, the session's start (``kernels_old``, OLD=its folder) against this tree: both addressings at four shapes,
CUDA-graph replays with L2 flushed (kernels.bench.time_us), interleaved passes, medians. The decode kernel's loop
moved into ``triton_common.attend_tiles``; its SASS instruction mix is unchanged, and this times it.

OLD=... python decode_ab.py [PASSES]
"""
from __future__ import annotations

import importlib
import os
import statistics
import sys

import torch

from kernels import triton_decode
from kernels.bench import Cache, interleaved, time_us

sys.path.insert(0, os.environ["OLD"])
old = importlib.import_module("kernels_old.triton_decode")
DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16


def main() -> None:
    passes = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(torch.cuda.get_device_name(), torch.__version__)
    for batch, ctx in ((1, 4096), (8, 4096), (64, 4096), (1, 32768)):
        cache = Cache(batch, ctx, DT, DEV)
        q = torch.randn(batch, HEADS, HD, dtype=DT, device=DEV)
        fns = {}
        for paged in (False, True):
            addr = cache.block_table(BS) if paged else cache.seq_starts
            for name, mod in (("old", old), ("new", triton_decode)):
                fn = (lambda mod=mod, addr=addr, paged=paged: mod.decode(
                    q, cache.k, cache.v, cache.seq_lens, addr, paged=paged, block_size=BS if paged else 1,
                    scale=HD ** -0.5, max_seq_len=ctx))
                fns[(name, "paged" if paged else "contig")] = fn
            a, b = fns[("old", "paged" if paged else "contig")](), fns[("new", "paged" if paged else "contig")]()
            print(f"b{batch} ctx{ctx} {'paged' if paged else 'contig'}: old and new outputs equal: {torch.equal(a, b)}")
        times = interleaved({k: (lambda fn=fn: time_us(fn, 40)) for k, fn in fns.items()}, passes)
        for k, ts in times.items():
            print(f"b{batch} ctx{ctx:<6} {k[0]} {k[1]:6} {statistics.median(ts):8.2f} us  "
                  f"[{' '.join(f'{t:.2f}' for t in ts)}]", flush=True)
        for addressing in ("contig", "paged"):
            r = statistics.median(times[("new", addressing)]) / statistics.median(times[("old", addressing)])
            print(f"b{batch} ctx{ctx:<6} {addressing}: new / old {r:.3f}")
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
