"""Prefill variants against the kernel as it is and against the peers, at the kernel bench's prefill shapes.

Variants: ``base`` is kernels/triton_prefill.py; in call 2, ``a`` and ``b`` were ``variants/``: ``a`` loads each
tile's block-table entries a tile ahead by hand and gives both addressings the same num_stages; ``b`` is ``a`` with
32-bit slot arithmetic where the cache plane allows it (both addressings). From call 3 on, ``a`` is in the kernel
and the variants are ``old`` and ``base``. OLD=dir holding ``kernels_old``: the session's start's kernels with
their imports renamed (call 2's variants build on its helpers, and ``base`` is then that tree's kernel). Every variant's output is checked against ``base`` with the same addressing (the paged table is a shuffle); each case's
variants and peers are timed in interleaved passes (CUDA-graph replay, L2 flushed, as kernels.bench), and the
table gives medians and every pass. Calls 2 and 3 timed the SDPA peers outside their backend context (mended
since): both SDPA rows of their logs are torch's default choice, not the backend they name.

python probe.py [PASSES] [tune] [variants]
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from kernels import peers, triton_prefill
from kernels.bench import Cache, causal_flops, interleaved, time_us
from kernels.triton_prefill import PrefillConfig

DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16
CASES = [(1, 0, 4096), (1, 0, 16384), (4, 0, 2048), (16, 0, 1024), (16, 0, 512), (32, 0, 256), (8, 0, 1024),
         (4, 4096, 512), (1, 16384, 2048)]
PEERS = ("sdpa_cudnn", "sdpa_flash", "flashinfer")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"prefill_{name}", Path(__file__).parent / "variants" / f"prefill_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sys.path.insert(0, os.environ["OLD"])
if "variants" in sys.argv:  # they build on the old kernels' helpers (call 2 ran them against 5563564's tree)
    MODS = {"base": importlib.import_module("kernels_old.triton_prefill"), "a": load("a"), "b": load("b")}
else:
    MODS = {"old": importlib.import_module("kernels_old.triton_prefill"), "base": triton_prefill}


def ours(mod, q, cache, qsl, addr, chunk, paged, config=None):
    a = addr["block_tables"] if paged else addr["seq_starts"]
    return lambda: mod.prefill(q, cache.k, cache.v, qsl, cache.seq_lens, a, paged=paged, block_size=BS if paged else 1,
                               scale=HD ** -0.5, max_query_len=chunk, max_seq_len=cache.length, config=config)


def _timed(fn, context) -> float:
    """``time_us`` inside the peer's context (SDPA's backend selection); calls 2 and 3 ran without it."""
    with context():
        return time_us(fn, 40)


def case(batch: int, context: int, chunk: int, passes: int, configs: dict | None = None) -> list[tuple]:
    total = context + chunk
    cache = Cache(batch, total, DT, DEV)
    q = torch.randn(batch * chunk, HEADS, HD, dtype=DT, device=DEV)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * chunk
    addrs = {False: cache.addressing(0), True: cache.addressing(BS)}
    refs = {paged: ours(triton_prefill, q, cache, qsl, addrs[paged], chunk, paged)() for paged in (False, True)}
    fns, contexts = {}, {}
    for name, mod in MODS.items():
        for cname, cfg in (configs or {None: None}).items():
            for paged in (False, True):
                key = (name if cname is None else f"{name}:{cname}", "paged" if paged else "contig")
                fn = ours(mod, q, cache, qsl, addrs[paged], chunk, paged, cfg)
                err = (fn().float() - refs[paged].float()).abs().max().item()
                assert err <= 2e-2 * refs[paged].float().abs().max().item(), (key, err)
                fns[key] = fn
    if configs is None:
        for name in PEERS:
            if name == "sdpa_flash" and context:
                continue
            try:
                peer = peers.build(name, cache, q, chunk, addrs[True]["block_tables"], BS)
                err = peers.max_error(peer.output(), refs[name in peers.PAGED_PEERS])
                if err > peers.TOLERANCE[DT]:
                    print(f"  {name}: mismatch {err:.3g}")
                    continue
                fns[(name, "peer")] = peer.call
                contexts[(name, "peer")] = peer.context
            except Exception as exc:  # noqa: BLE001 - a peer's failure is its row's
                print(f"  {name}: {peers.reason(exc)}")
    timers = {k: (lambda fn=fn, k=k: _timed(fn, contexts.get(k, contextlib.nullcontext))) for k, fn in fns.items()}
    times = interleaved(timers, passes)
    flops = causal_flops(batch, context, chunk)
    rows = []
    for key, ts in times.items():
        med = statistics.median(ts)
        rows.append((f"b{batch} ctx{context}+{chunk}", *key, med, flops / med / 1e6, ts))
    best = min(r[3] for r in rows if r[2] in ("contig", "paged") and r[1].startswith("base"))
    peer_best = min((r[3] for r in rows if r[2] == "peer"), default=math.nan)
    for r in rows:
        print(f"{r[0]:18} {r[1]:14} {r[2]:6} {r[3]:8.1f} us {r[4]:5.0f} TF  /base-best {r[3] / best:5.3f}  "
              f"peer/x {peer_best / r[3]:5.3f}  [{' '.join(f'{t:.1f}' for t in r[5])}]", flush=True)
    del cache, fns, timers
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    passes = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    print(torch.cuda.get_device_name(), torch.__version__, __import__("triton").__version__)
    if "tune" in sys.argv:
        cfgs = {f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}": c for c in (
            PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 128, 8, 2), PrefillConfig(128, 64, 8, 3),
            PrefillConfig(128, 64, 8, 4), PrefillConfig(64, 64, 4, 3), PrefillConfig(64, 32, 4, 3),
            PrefillConfig(128, 32, 8, 4))}
        MODS.pop("a", None)
        MODS.pop("old", None)
        for c in [(1, 0, 4096), (16, 0, 512), (4, 4096, 512), (32, 0, 256), (16, 0, 1024)]:
            case(*c, passes, cfgs)
        return
    for c in CASES:
        case(*c, passes)


if __name__ == "__main__":
    main()
