"""Decode-sized linear layers on the GPU: cuBLAS (and cuBLASLt) against kernels.triton_linear, timed as CUDA-graph
replays (what a decode step sees), with correctness and batch-invariance checks. Prints a table per section.

python probe.py [check|sweep|compare|all]
"""
from __future__ import annotations

import itertools
import sys
import time

import torch
import torch.nn.functional as F
import triton

from kernels.triton_layers import silu_and_mul
from kernels.triton_linear import LinearTiles, choose_tiles, skinny_linear

SHAPES = {  # name: (N, K) of the weight
    "qwen.qkv": (4096, 1024), "qwen.o": (1024, 2048), "qwen.gate_up": (6144, 1024), "qwen.down": (1024, 3072),
    "llama.qkv": (6144, 4096), "llama.o": (4096, 4096), "llama.gate_up": (28672, 4096), "llama.down": (4096, 14336),
}
DEV = torch.device("cuda")
DT = torch.bfloat16


def graph_us(fn, reps: int = 20) -> float:
    """Median µs of one call, from CUDA-graph replays of ``reps`` calls back to back."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(lambda: [fn() for _ in range(reps)], rep=100) * 1000 / reps


def operands(m, n, k, silu=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, device=DEV, dtype=DT, generator=g)
    w = (torch.randn(n, k, device=DEV, dtype=DT, generator=g) * k ** -0.5).to(DT)
    return x, w


def check() -> None:
    print("== check: error against float32, batch invariance, fused == unfused ==")
    print(f"{'shape':14} {'m':>3} {'rel err ours':>12} {'rel err cublas':>14} {'rows equal m=1':>15} {'fused==unfused':>14}")
    for name, (n, k) in SHAPES.items():
        for m in (1, 7, 64):
            silu = name.endswith("down")
            x, w = operands(m, n, k, silu)
            xin = silu_and_mul(x) if silu else x
            ref = F.linear(xin.float(), w.float())
            ours = skinny_linear(xin, w)
            cub = F.linear(xin, w)
            rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()
            rows_eq = all(torch.equal(skinny_linear(xin[i:i + 1], w)[0], ours[i]) for i in range(m))
            fused = torch.equal(skinny_linear(x, w, silu_gate_up=True), ours) if silu else None
            print(f"{name:14} {m:>3} {rel(ours):>12.2e} {rel(cub):>14.2e} {str(rows_eq):>15} {str(fused):>14}")
            bias = torch.randn(n, device=DEV, dtype=DT)
            yb = skinny_linear(xin, w, bias)
            assert ((yb.float() - (ref + bias.float())).norm() / ref.norm()).item() < 1e-2


def sweep() -> None:
    print("== sweep: µs per call (graph replay), qwen shapes, m = 64 and 16 ==")
    for name in ("qwen.qkv", "qwen.o", "qwen.gate_up", "qwen.down"):
        n, k = SHAPES[name]
        for m in (64, 16):
            x, w = operands(m, n, k)
            base = graph_us(lambda: F.linear(x, w))
            rows = []
            for bn, bk, sk, st in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16), (3, 4, 6)):
                ctas = -(-n // bn) * sk
                if not 64 <= ctas <= 1100 or k // sk < bk:
                    continue
                t = LinearTiles(bn, bk, sk, num_stages=st)
                try:
                    us = graph_us(lambda: skinny_linear(x, w, tiles=t))
                except Exception as e:  # out of shared memory and the like
                    continue
                rows.append((us, t))
            rows.sort(key=lambda r: r[0])
            dflt = choose_tiles(n, k, DEV)
            d_us = graph_us(lambda: skinny_linear(x, w, tiles=dflt))
            print(f"{name} m={m}: cublas {base:.2f} µs; default {dflt} {d_us:.2f} µs; best:")
            for us, t in rows[:5]:
                print(f"    {us:.2f}  {t}")
            sys.stdout.flush()


def compare() -> None:
    print("== compare: µs per call, graph replay ==")
    print(f"{'shape':14} {'m':>3} {'cublas':>8} {'cublasLt':>9} {'ours':>8} {'ours/cublas':>11} {'weight-read floor':>17}")
    bw = 3.0e12  # a bf16 read of 2 GiB runs at about 3,000 GB/s on these H100s
    for name, (n, k) in SHAPES.items():
        for m in (1, 16, 32, 64):
            silu = name.endswith("down")
            x, w = operands(m, n, k, silu)
            if silu:
                cub = lambda: F.linear(silu_and_mul(x), w)
                ours = lambda: skinny_linear(x, w, silu_gate_up=True)
            else:
                cub = lambda: F.linear(x, w)
                ours = lambda: skinny_linear(x, w)
            a = graph_us(cub)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            b = graph_us(cub)
            torch.backends.cuda.preferred_blas_library("cublas")
            c = graph_us(ours)
            print(f"{name + ('+silu' if silu else ''):14} {m:>3} {a:8.2f} {b:9.2f} {c:8.2f} {c / a:11.2f} "
                  f"{n * k * 2 / bw * 1e6:17.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    t0 = time.time()
    if what in ("check", "all"):
        check()
    if what in ("compare", "all"):
        compare()
    if what in ("sweep", "all"):
        sweep()
    print(f"done in {time.time() - t0:.0f} s")
