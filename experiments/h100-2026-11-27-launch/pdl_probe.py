"""Why an eager decode call costs the host more at batch 8 than at batch 1 (host_probe.py: 95-103 against 57 µs a
call, while the device needs ~50): our kernels launch as programmatic dependents on Hopper (``launch_pdl``). This
times this tree's eager decode, back to back, with programmatic dependent launch on (as the engines run) and off
(``triton_common._TRITON_HAS_PDL`` cleared, which compiles and launches the kernels without it), at batch 1 and 8 x
4,096, over 100 / 400 calls, both addressings, beside SDPA cuDNN; and the same call repeated through
``triton_ops.repeatable`` (no wrapper, no allocation). Interleaved passes, medians; ``host`` as in host_probe.py.

python pdl_probe.py [PASSES]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import triton_common, triton_ops
from kernels.bench import Cache, interleaved

DEV, DT, HEADS, HD, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 16


def host_and_wall(fn, calls: int, pdl: bool | None) -> tuple[float, float]:
    triton_common._TRITON_HAS_PDL = True if pdl is None else pdl
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def main() -> None:
    passes = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for batch in (1, 8):
        cache = Cache(batch, 4096, DT, DEV)
        q = torch.randn(batch, HEADS, HD, dtype=DT, device=DEV)
        out = torch.empty_like(q)
        addrs = {"contiguous": cache.addressing(0), "paged": cache.addressing(BS)}
        timers = {}
        for name, addr in addrs.items():
            call = (lambda addr=addr: triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens,
                                                                  max_seq_len=4096, validate=False, **addr))
            for pdl in (True, False):
                triton_common._TRITON_HAS_PDL = pdl
                again = triton_ops.repeatable(lambda k, v, addr=addr: triton_ops.decode_attention(
                    q, k, v, cache.seq_lens, max_seq_len=4096, validate=False, out=out, **addr), cache.k, cache.v)
                rep = (lambda again=again: again(cache.k, cache.v))
                for calls in (100, 400):
                    timers[(name, "pdl" if pdl else "no-pdl", "call", calls)] = (
                        lambda call=call, calls=calls, pdl=pdl: host_and_wall(call, calls, pdl))
                    timers[(name, "pdl" if pdl else "no-pdl", "repeat", calls)] = (
                        lambda rep=rep, calls=calls, pdl=pdl: host_and_wall(rep, calls, pdl))
        k4, v4 = (x.view(batch, 4096, 8, HD).transpose(1, 2) for x in (cache.k, cache.v))
        q4 = q.view(batch, 1, HEADS, HD).transpose(1, 2)

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)

        def sdpa_timer(calls: int) -> tuple[float, float]:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # around the loop, as kernels.bench does
                return host_and_wall(sdpa, calls, None)
        for calls in (100, 400):
            timers[("sdpa_cudnn", "-", "call", calls)] = (lambda calls=calls: sdpa_timer(calls))
        times = interleaved(timers, passes)
        for key, ts in times.items():
            host, wall = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
            print(f"b{batch} x 4096 {key[0]:11} {key[1]:6} {key[2]:6} {key[3]:4} calls: host {host:7.1f} us  "
                  f"wall {wall:7.1f} us  [host {min(t[0] for t in ts):.1f}-{max(t[0] for t in ts):.1f}]", flush=True)
        del cache
        torch.cuda.empty_cache()
    triton_common._TRITON_HAS_PDL = True


if __name__ == "__main__":
    main()
