"""An eager attention call's host cost: the session's start (``kernels_old``, OLD=its folder) against this tree, beside
SDPA (cuDNN and flash) and FlashInfer's ``run()`` (planned outside timing), at the llama-3.1-8b attention shape
(32 query / 8 KV heads, head_dim 128), bf16, block 16, shuffled table.

Per variant and pass: ``host`` = the host's time to issue ``CALLS`` back-to-back calls (perf_counter around the loop,
the device synchronized before it and after it, outside the clock), per call; ``wall`` = the same loop with the final
synchronize inside the clock, per call (kernels.bench's eager_us). Passes interleave the variants; medians and the
passes' range are printed. Also: old and new outputs bit-equal, one launch of a small layer kernel, and a cProfile of
this tree's eager decode call.

OLD=... python host_probe.py [PASSES]
"""
from __future__ import annotations

import cProfile
import importlib
import io
import os
import pstats
import statistics
import sys
import time

import torch

from kernels import peers, triton_ops
from kernels.bench import Cache, interleaved

sys.path.insert(0, os.environ["OLD"])
old_ops = importlib.import_module("kernels_old.triton_ops")
DEV, DT, HEADS, HD, BS, CALLS = torch.device("cuda"), torch.bfloat16, 32, 128, 16, 400


def host_and_wall(fn, context) -> tuple[float, float]:
    with context():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
    return (issued - start) / CALLS * 1e6, (done - start) / CALLS * 1e6


def ours(ops, kind: str, cache: Cache, q: torch.Tensor, q_len: int, addr: dict):
    if kind == "decode":
        return lambda: ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, max_seq_len=cache.length,
                                            validate=False, **addr)
    qsl = torch.arange(cache.batch + 1, device=DEV, dtype=torch.int32) * q_len
    return lambda: ops.prefill_attention(q, cache.k, cache.v, qsl, cache.seq_lens, max_query_len=q_len,
                                         max_seq_len=cache.length, validate=False, **addr)


def case(kind: str, batch: int, length: int, q_len: int, passes: int) -> dict:
    cache = Cache(batch, length, DT, DEV)
    q = torch.randn(batch * q_len, HEADS, HD, dtype=DT, device=DEV)
    fns, contexts = {}, {}
    addrs = {"contiguous": cache.addressing(0), "paged": cache.addressing(BS)}
    for name, addr in addrs.items():
        old, new = ours(old_ops, kind, cache, q, q_len, addr), ours(triton_ops, kind, cache, q, q_len, addr)
        equal = torch.equal(old(), new())
        print(f"{kind} b{batch} len{length} q{q_len} {name}: old and new outputs equal: {equal}")
        fns[("old", name)], fns[("new", name)] = old, new
    table = addrs["paged"]["block_tables"]
    for peer in ("sdpa_cudnn", "sdpa_flash", "flashinfer"):
        try:
            p = peers.build(peer, cache, q, q_len, table, BS)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            print(f"  {peer}: unavailable ({peers.reason(exc)})")
            continue
        fns[("peer", peer)], contexts[("peer", peer)] = p.call, p.context
    timers = {key: (lambda fn=fn, key=key: host_and_wall(fn, contexts.get(key, _null))) for key, fn in fns.items()}
    times = interleaved(timers, passes)
    rows = {}
    for key, ts in times.items():
        host, wall = [t[0] for t in ts], [t[1] for t in ts]
        rows[key] = statistics.median(host), statistics.median(wall)
        print(f"{kind} b{batch} len{length} q{q_len} {key[0]:4} {key[1]:11} host {rows[key][0]:7.1f} us "
              f"[{min(host):.1f}-{max(host):.1f}]  wall {rows[key][1]:7.1f} us [{min(wall):.1f}-{max(wall):.1f}]",
              flush=True)
    del cache
    torch.cuda.empty_cache()
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def layer_launch(passes: int) -> None:
    """One launch of a small elementwise kernel (silu_and_mul on [1, 2 x 14,336]), old against new: the launch path
    alone, its kernel a few µs."""
    x = torch.randn(1, 2 * 14336, dtype=DT, device=DEV)
    fns = {"old": lambda: old_ops.silu_and_mul(x), "new": lambda: triton_ops.silu_and_mul(x),
           "torch": lambda: torch.nn.functional.silu(x[:, :14336]) * x[:, 14336:]}
    print(f"silu_and_mul old and new equal: {torch.equal(fns['old'](), fns['new']())}")
    times = interleaved({k: (lambda fn=fn: host_and_wall(fn, _null)) for k, fn in fns.items()}, passes)
    for key, ts in times.items():
        print(f"silu_and_mul {key:5} host {statistics.median(t[0] for t in ts):6.1f} us  "
              f"wall {statistics.median(t[1] for t in ts):6.1f} us")


def profile_new() -> None:
    cache = Cache(1, 4096, DT, DEV)
    q = torch.randn(1, HEADS, HD, dtype=DT, device=DEV)
    fn = ours(triton_ops, "decode", cache, q, 1, cache.addressing(BS))
    for _ in range(50):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    print("cProfile, 2,000 eager paged decode calls b1 x 4,096 (this tree), by own time:")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-2200:])


def main() -> None:
    passes = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", importlib.import_module("triton").__version__)
    summary = []
    for kind, batch, length, q_len in (("decode", 1, 4096, 1), ("decode", 8, 4096, 1), ("decode", 64, 1024, 1),
                                       ("prefill", 1, 512, 512), ("prefill", 4, 4608, 512)):
        rows = case(kind, batch, length, q_len, passes)
        sdpa = min((v[0] for k, v in rows.items() if k[1].startswith("sdpa")), default=float("nan"))
        for side in ("old", "new"):
            worst = max(rows[(side, "paged")][0], rows[(side, "contiguous")][0])
            summary.append(f"{kind:7} b{batch:<2} len{length:<5} q{q_len:<3} {side}: host contiguous "
                           f"{rows[(side, 'contiguous')][0]:6.1f}  paged {rows[(side, 'paged')][0]:6.1f} us; "
                           f"paged/contiguous {rows[(side, 'paged')][0] / rows[(side, 'contiguous')][0]:.2f}; "
                           f"slower / fastest SDPA ({sdpa:.1f}) {worst / sdpa:.2f}")
    layer_launch(passes)
    profile_new()
    print("\nSUMMARY (host us per eager call, medians of passes)")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
