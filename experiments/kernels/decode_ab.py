"""Decode before / after the block-table change, side by side in one process (issue 4).

Interleaves every variant of a shape, three times, and prints the medians of
``kernels.bench.time_us`` (CUDA-graph replay, L2 flushed), so that paged / contiguous
ratios of 11-20 µs kernels are not left to one pass each. Run 2 of
``h100_decode_ab_run2.log`` ran it at d3340be. Needs the kernels of c82b473 next to the
current ones, from the repository root:

    git show c82b473:kernels/triton_common.py > kernels/_old_common.py
    git show c82b473:kernels/triton_decode.py \
        | sed 's/from kernels.triton_common import/from kernels._old_common import/' > kernels/_old_decode.py
    REP_MS=100 PYTHONPATH=. python experiments/kernels/decode_ab.py OUT_DIR

Variants: ``old_*`` c82b473; ``new_*`` the current kernel and split heuristic; ``st3_*``
three pipeline stages; ``mt1_*`` splits of one tile allowed (``min_tiles_per_split=1``).
(A paged output differs from the contiguous one at batch > 1: the shuffled block table
mixes the sequences' tokens, so only batch 1 is checked across addressings.)
"""
import os
import statistics
import sys

import torch

from kernels import _old_decode as old
from kernels import triton_decode as new
from kernels.bench import HEAD_DIM, HEADS, KV_HEADS, Cache, time_us
from kernels.triton_common import sm_count

dev = torch.device("cuda")
dt = torch.bfloat16
REPS = 3
REP_MS = int(os.environ.get("REP_MS", "120"))
CASES = [(1, 512), (1, 2048), (1, 4096), (4, 512), (4, 2048), (16, 512), (1, 16384)]
SMALL = set(CASES)


def fn_for(mod, q, cache, addr, bs, ctx, config=None, num_splits=None):
    paged = bs > 0

    def fn():
        return mod.decode(q, cache.k, cache.v, cache.seq_lens, addr, paged=paged, block_size=bs if paged else 1,
                          scale=HEAD_DIM**-0.5, max_seq_len=ctx, config=config, num_splits=num_splits)
    return fn


def main():
    out = sys.argv[1]
    lines = []
    for batch, ctx in CASES:
        cache = Cache(batch, ctx, dt, dev)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dt, device=dev)
        addrs = {0: cache.seq_starts, 1: cache.block_table(1), 16: cache.block_table(16), 256: cache.block_table(256)}
        cfg = new.decode_config(HEAD_DIM, dt, dev)
        splits = new.num_kv_splits(batch, KV_HEADS, ctx, sm_count(dev), cfg)
        st3 = new.DecodeConfig(block_n=64, num_warps=4, num_stages=3)
        mt1 = new.DecodeConfig(block_n=64, num_warps=4, num_stages=2, min_tiles_per_split=1)
        variants = {
            "old_c": fn_for(old, q, cache, addrs[0], 0, ctx),
            "old_p16": fn_for(old, q, cache, addrs[16], 16, ctx),
            "new_c": fn_for(new, q, cache, addrs[0], 0, ctx),
            "new_p16": fn_for(new, q, cache, addrs[16], 16, ctx),
            "new_p1": fn_for(new, q, cache, addrs[1], 1, ctx),
            "new_p256": fn_for(new, q, cache, addrs[256], 256, ctx),
            "st3_c": fn_for(new, q, cache, addrs[0], 0, ctx, config=st3),
            "st3_p16": fn_for(new, q, cache, addrs[16], 16, ctx, config=st3),
            "mt1_c": fn_for(new, q, cache, addrs[0], 0, ctx, config=mt1),
            "mt1_p16": fn_for(new, q, cache, addrs[16], 16, ctx, config=mt1),
        }
        # correctness of the new variants against the old kernel on this case
        ref = variants["old_c"]().float()
        for name, f in variants.items():
            err = (f().float() - ref).abs().max().item()
            if err > 2e-2 and not (name.endswith(("p16", "p1", "p256")) and batch > 1):
                print(f"MISMATCH {batch} {ctx} {name} {err}", flush=True)
        times = {name: [] for name in variants}
        for _ in range(REPS):
            for name, f in variants.items():
                times[name].append(time_us(f, REP_MS))
        med = {name: statistics.median(v) for name, v in times.items()}
        line = f"b{batch:<4d} ctx{ctx:<6d} splits{splits:<3d} " + " ".join(
            f"{n}={med[n]:.2f}" for n in variants)
        r = "  RATIO " + " ".join(f"{n}={med[a] / med[b]:.3f}" for n, a, b in [
            ("old_p16/c", "old_p16", "old_c"), ("new_p16/c", "new_p16", "new_c"), ("new_p1/c", "new_p1", "new_c"),
            ("new_p256/c", "new_p256", "new_c"), ("st3_p16/c", "st3_p16", "st3_c"), ("mt1_p16/c", "mt1_p16", "mt1_c"),
            ("new_c/old_c", "new_c", "old_c"), ("st3_c/new_c", "st3_c", "new_c")])
        r += f" splits_mt1={new.num_kv_splits(batch, KV_HEADS, ctx, sm_count(dev), mt1)}"
        spread = " spread(max-min) " + " ".join(f"{n}={max(v) - min(v):.2f}" for n, v in times.items()
                                                if n in ("old_c", "old_p16", "new_c", "new_p16"))
        print(line + "\n" + r + "\n" + spread, flush=True)
        lines.append(line + "\n" + r + "\n" + spread)
        del cache, addrs, variants
        torch.cuda.empty_cache()
    with open(os.path.join(out, "cmp.txt"), "w") as fh:
        fh.write(torch.cuda.get_device_name() + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
