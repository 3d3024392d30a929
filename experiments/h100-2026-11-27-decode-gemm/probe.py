"""Decode-sized linear layers in a decode step's chain of kernels: cuBLAS against kernels.triton_linear launched
as a programmatic dependent that reads its weight before the wait. A chain is qwen3-0.6b's 28 layers at m rows,
each: add_rms_norm -> qkv -> decode attention (contiguous, 640-token context) -> o -> add_rms_norm -> gate_up ->
silu -> down, captured as one CUDA graph (distinct weights and caches per layer, so they stream from HBM).
Also: correctness (error against float32, fused == unfused, batch invariance). Prints a table per section.
It ran (call 1) against the tried kernel, ``tried/triton_linear_prefetch.py.txt`` (``run.sh OUT probe`` copies it
over kernels/triton_linear.py): the variants ``_pf`` load weight tiles before the wait, ``_fused`` fuse SwiGLU's
activation into the down projection, ``_nopdl`` launch it the usual way; ``few`` are session 14's best tiles.

python probe.py [check|chain|all]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kernels import triton_decode
from kernels.triton_layers import add_rms_norm, silu_and_mul
from kernels.triton_linear import LinearTiles, choose_tiles, skinny_linear

DEV, DT = torch.device("cuda"), torch.bfloat16
H, Q, KV, I, LAYERS, HD, CTX = 1024, 2048, 1024, 3072, 28, 128, 640
SHAPES = {"qkv": (Q + 2 * KV, H), "o": (H, Q), "gate_up": (2 * I, H), "down": (H, I)}
# session 14's best tiles at 64 rows, without a prefetch (few splits)
FEW = {"qkv": LinearTiles(64, 128, 1, 0, 4), "o": LinearTiles(64, 128, 4, 0, 3),
       "gate_up": LinearTiles(64, 128, 1, 0, 3), "down": LinearTiles(64, 128, 4, 0, 4)}


def check() -> None:
    print("== check ==")
    print(f"{'shape':8} {'m':>3} {'tiles':52} {'rel ours':>9} {'rel cublas':>10} {'rows==m1':>8} {'fused==':>7}")
    for name, (n, k) in SHAPES.items():
        for m in (1, 7, 64):
            g = torch.Generator(device=DEV).manual_seed(m)
            silu = name == "down"
            x = torch.randn(m, 2 * k if silu else k, device=DEV, dtype=DT, generator=g)
            w = (torch.randn(n, k, device=DEV, generator=g) * k ** -0.5).to(DT)
            xin = silu_and_mul(x) if silu else x
            ref = F.linear(xin.float(), w.float())
            ours = skinny_linear(xin, w)
            rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
            rows_eq = all(torch.equal(skinny_linear(xin[i:i + 1], w)[0], ours[i]) for i in range(m))
            fused = torch.equal(skinny_linear(x, w, silu_gate_up=True), ours) if silu else None
            t = choose_tiles(n, k, DEV)
            print(f"{name:8} {m:>3} {str(t):52} {rel(ours):9.2e} {rel(F.linear(xin, w)):10.2e} {str(rows_eq):>8} "
                  f"{str(fused):>7}")
            assert rel(ours) < 1e-2 and rows_eq and fused in (None, True)


class Chain:
    def __init__(self, m: int) -> None:
        g = torch.Generator(device=DEV).manual_seed(0)
        rnd = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale).to(DT)  # noqa: E731
        self.m = m
        self.w = {name: [rnd(n, k, scale=k ** -0.5) for _ in range(LAYERS)] for name, (n, k) in SHAPES.items()}
        self.norm = [rnd(H) for _ in range(2 * LAYERS)]
        self.k = [rnd(m * CTX, KV // HD, HD) for _ in range(LAYERS)]
        self.v = [rnd(m * CTX, KV // HD, HD) for _ in range(LAYERS)]
        self.starts = torch.arange(m, device=DEV, dtype=torch.int32) * CTX
        self.lens = torch.full((m,), CTX, device=DEV, dtype=torch.int32)
        self.x0 = rnd(m, H)
        self.res0 = rnd(m, H)
        self.attn = torch.empty(m, Q // HD, HD, device=DEV, dtype=DT)

    def forward(self, lin, fused: bool) -> torch.Tensor:
        x, res = self.x0, self.res0.clone()
        for i in range(LAYERS):
            h, res = add_rms_norm(x, res, self.norm[2 * i], 1e-6)
            qkv = lin("qkv", h, self.w["qkv"][i])
            q = qkv[:, :Q].view(self.m, Q // HD, HD)
            triton_decode.decode(q, self.k[i], self.v[i], self.lens, self.starts, paged=False, block_size=1,
                                 scale=HD ** -0.5, max_seq_len=CTX, out=self.attn)
            o = lin("o", self.attn.view(self.m, Q), self.w["o"][i])
            h, res = add_rms_norm(o, res, self.norm[2 * i + 1], 1e-6)
            gu = lin("gate_up", h, self.w["gate_up"][i])
            x = lin("down_fused", gu, self.w["down"][i]) if fused else lin("down", silu_and_mul(gu), self.w["down"][i])
        return x + res


def cublas(name, x, w):
    return F.linear(x, w)


def skinny(tiles: dict, pdl: bool, only=None):
    def lin(name, x, w):
        base = name.removesuffix("_fused")
        if only is not None and base not in only:
            return F.linear(silu_and_mul(x) if name == "down_fused" else x, w)
        return skinny_linear(x, w, tiles=tiles.get(base), pdl=pdl, silu_gate_up=name == "down_fused")
    return lin


def variants(m: int) -> dict:
    dflt = {name: choose_tiles(n, k, DEV) for name, (n, k) in SHAPES.items()}
    few_pf = {name: LinearTiles(t.block_n, t.block_k, t.split_k, 2, t.num_stages) for name, t in FEW.items()}
    v = {
        "cublas": (cublas, False),
        "skinny_few_nopdl": (skinny(FEW, False), False),
        "skinny_few_pdl": (skinny(FEW, True), False),
        "skinny_few_pdl_pf2": (skinny(few_pf, True), False),
        "skinny_dflt_pdl_pf": (skinny(dflt, True), False),
        "skinny_dflt_pdl_pf_fused": (skinny(dflt, True), True),
        "skinny_few_pdl_pf2_fused": (skinny(few_pf, True), True),
    }
    if m == 64:
        for name in SHAPES:
            v[f"only_{name}_dflt_pf"] = (skinny(dflt, True, only={name}), False)
    return v


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def time_graph(g, reps=20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def chain(m: int, passes: int = 5) -> None:
    c = Chain(m)
    graphs, outs = {}, {}
    for name, (lin, fused) in variants(m).items():
        graphs[name], outs[name] = graph_of(lambda: c.forward(lin, fused))
    times = {name: [] for name in graphs}
    for _ in range(passes):
        for name, g in graphs.items():
            times[name].append(time_graph(g))
    base = statistics.median(times["cublas"])
    ref = outs["cublas"].float()
    print(f"== chain m={m}: 28 layers, µs per step (median of {passes} passes of 20 replays) ==")
    print(f"{'variant':28} {'median':>8} {'min':>8} {'max':>8} {'/cublas':>8} {'us/layer':>8} {'rel err':>8}")
    for name, t in times.items():
        med = statistics.median(t)
        err = ((outs[name].float() - ref).norm() / ref.norm()).item()
        print(f"{name:28} {med:8.1f} {min(t):8.1f} {max(t):8.1f} {med / base:8.3f} {med / LAYERS:8.2f} {err:8.1e}")
    sys.stdout.flush()
    del c, graphs, outs
    torch.cuda.empty_cache()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    t0 = time.time()
    if what in ("check", "all"):
        check()
    if what in ("chain", "all"):
        for m in (64, 32, 8):
            chain(m)
    print(f"done in {time.time() - t0:.0f} s")
