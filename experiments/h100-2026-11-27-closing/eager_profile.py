"""Where an eager decode call's time goes at batch 1 and 8 x 4,096 (call 4's bench read ours at 62 µs a call at
batch 1 and 109-115 at batch 8, against SDPA cuDNN's 23 and 53): torch.profiler over 50 back-to-back eager calls of
this tree's decode, both addressings, with programmatic dependent launch on (as the engines run) and off. Prints,
per setting, the wall time per call, the host's time to issue a call, each kernel's mean device time, and the mean
idle gap on the device between one call's last kernel and the next call's first.

python eager_profile.py
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kernels import triton_common, triton_ops
from kernels.bench import Cache

DEV, DT, HEADS, HD, BS, CALLS = torch.device("cuda"), torch.bfloat16, 32, 128, 16, 50


def timed(call) -> tuple[float, float]:
    """Host µs to issue CALLS calls, and wall µs until they finish, per call (median of 5)."""
    issue, wall = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        issue.append((issued - start) / CALLS * 1e6)
        wall.append((done - start) / CALLS * 1e6)
    return statistics.median(issue), statistics.median(wall)


def kernels(call) -> tuple[dict[str, float], float]:
    """Each kernel's mean device µs over CALLS calls, and the mean device gap µs before each call's first kernel."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per: dict[str, list[float]] = {}
    for e in events:
        per.setdefault(e.name[:40], []).append(e.time_range.elapsed_us())
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(events, events[1:]) if "split" in b.name]
    return {k: statistics.mean(v) for k, v in per.items()}, statistics.mean(gaps) if gaps else float("nan")


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for batch in (1, 8):
        cache = Cache(batch, 4096, DT, DEV)
        q = torch.randn(batch, HEADS, HD, dtype=DT, device=DEV)
        for name, addr in (("contiguous", cache.addressing(0)), ("paged", cache.addressing(BS))):
            call = (lambda addr=addr: triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens,
                                                                  max_seq_len=4096, validate=False, **addr))
            for pdl in (True, False):
                triton_common._TRITON_HAS_PDL = pdl
                call()
                issue, wall = timed(call)
                per, gap = kernels(call)
                desc = ", ".join(f"{k} {v:.1f}" for k, v in per.items())
                print(f"b{batch} {name:10} pdl={pdl!s:5} issue {issue:6.1f} us  wall {wall:6.1f} us  "
                      f"gap before a call {gap:6.1f} us  kernels: {desc}", flush=True)
        del cache
        torch.cuda.empty_cache()
    triton_common._TRITON_HAS_PDL = True


if __name__ == "__main__":
    main()
