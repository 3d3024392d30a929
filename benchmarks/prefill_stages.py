"""The one code-path difference left between the paged and contiguous engines, measured:
``python -m benchmarks.prefill_stages [--passes N] [--out CSV]`` (CUDA).

The prefill kernel compiles its paged variant with one Triton pipeline stage more than the
contiguous one (``kernels.triton_common.pipeline_stages``), so that the block-table loads are
issued a stage ahead of the K/V tiles they address; both then buffer the same K/V tiles. A
reviewer may read that as a confound. This times each addressing at both depths on the same
problems, in interleaved passes (medians), so the report can say what the extra stage is
worth to each: ``contiguous@2`` and ``paged@3`` are what the engines run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch

from kernels.bench import HEAD_DIM, HEADS, Cache, causal_flops, interleaved, time_us
from kernels.triton_prefill import PrefillConfig, prefill, prefill_config

# (batch, context already cached, new tokens): whole prompts and a chunk after a long context
CASES = ((1, 0, 8192), (8, 0, 1024), (32, 0, 512), (4, 4096, 512))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_stages", description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    base = prefill_config(HEAD_DIM, dtype, device)
    rows = []
    for batch, context, chunk in CASES:
        cache = Cache(batch, context + chunk, dtype, device)
        q = torch.randn(batch * chunk, HEADS, HEAD_DIM, dtype=dtype, device=device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * chunk
        timers = {}
        for paged in (False, True):
            addr = cache.block_table(16) if paged else cache.seq_starts
            for stages in (2, 3):  # Triton num_stages as compiled; paged adds one to the config's depth
                config = PrefillConfig(base.block_m, base.block_n, base.num_warps, stages - 1 if paged else stages)
                fn = (lambda addr=addr, paged=paged, config=config: prefill(  # noqa: E731
                    q, cache.k, cache.v, qsl, cache.seq_lens, addr, paged=paged, block_size=16 if paged else 1,
                    scale=HEAD_DIM ** -0.5, max_query_len=chunk, config=config))
                timers[("paged" if paged else "contiguous", stages)] = (lambda fn=fn: time_us(fn, args.rep_ms))
        times = interleaved(timers, args.passes)
        flops = causal_flops(batch, context, chunk)
        for (addressing, stages), ts in times.items():
            us = statistics.median(ts)
            rows.append({"batch": batch, "context": context, "chunk": chunk, "addressing": addressing, "num_stages": stages,
                         "engine_default": (addressing, stages) in (("contiguous", 2), ("paged", 3)), "time_us": us,
                         "tflops": flops / us / 1e6, "passes": ";".join(f"{t:.2f}" for t in ts)})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"prefill: time (µs, median of {args.passes} interleaved passes) by addressing and Triton num_stages "
          f"({torch.cuda.get_device_name()}); engines run contiguous@2 and paged@3")
    print(f"{'batch x (context + chunk)':>26} {'contig@2':>9} {'contig@3':>9} {'paged@2':>9} {'paged@3':>9} "
          f"{'paged@3/contig@2':>17} {'paged@3/contig@3':>17}")
    for batch, context, chunk in CASES:
        t = {(r["addressing"], r["num_stages"]): r["time_us"] for r in rows
             if (r["batch"], r["context"], r["chunk"]) == (batch, context, chunk)}
        print(f"{f'{batch} x ({context} + {chunk})':>26} {t['contiguous', 2]:>9.1f} {t['contiguous', 3]:>9.1f} "
              f"{t['paged', 2]:>9.1f} {t['paged', 3]:>9.1f} {t['paged', 3] / t['contiguous', 2]:>17.3f} "
              f"{t['paged', 3] / t['contiguous', 3]:>17.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
