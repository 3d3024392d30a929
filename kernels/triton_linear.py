"""A linear layer for decode-sized batches (``y = x @ W.T + b`` with at most ``MAX_ROWS`` rows), launched as a
programmatic dependent like our other model-step kernels.

At a decode step's few rows a linear layer is a read of its weight, and cuBLAS takes 4-7 µs for each of a
qwen3-0.6b layer's projections against 1.4-4.2 µs of weight bytes; the rest is each kernel's start and end. cuBLAS
kernels launch the usual way, so the kernel after one cannot start before it has finished, nor can one start
before the kernel ahead of it has. This kernel launches with ``triton_common.pdl_options``: a layer's boundaries
between its GEMMs and our norm, activation and attention kernels all overlap (measured in
``experiments/h100-2026-11-27-decode-gemm/``).

Each program holds ``BLOCK_N`` rows of the weight and multiplies them by all of the batch's rows
(``W_tile @ x_tile.T``), over one of ``SPLIT_K`` slices of K. The slices' partial sums meet without atomics on
values: each program writes its partial to a workspace and takes a ticket; the last of a tile's programs adds the
partials in split order. So results are deterministic, and as the tiling depends on (N, K) only, a row's result is
the same at every batch size up to ``MAX_ROWS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import triton_layers
from kernels.checks import KernelArgumentError
from kernels.triton_common import (
    cdiv,
    interpreter_upcast,
    launch,
    next_power_of_2,
    pdl_options,
    sm_count,
    wait_for_inputs,
)
from kernels.triton_layers import silu_mul, use_libdevice

# The most rows the kernel takes: above it a linear layer has enough rows to be cuBLAS's kind of GEMM.
MAX_ROWS = 64
# Weight rows and K columns per program step (``choose_tiles``): 64 x 128 weight tiles, the best at every
# qwen3-0.6b projection.
BLOCK_N, BLOCK_K = 64, 128
# The fewest batch rows a tile holds: tl.dot's smallest dimension.
MIN_BLOCK_M = 16
# What it takes on CUDA (float32 would run as TF32).
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LinearTiles:
    """One launch's tiling: weight rows per program, K per loop step, programs per output tile, pipeline depth and
    warps."""

    block_n: int
    block_k: int
    split_k: int
    num_stages: int = 4
    num_warps: int = 4


def choose_tiles(n: int, k: int, device: torch.device) -> LinearTiles:
    """Tiles by the weight's shape alone (never the batch's, for batch invariance): 64 weight rows and 128 of K a
    program's step, and K split in two while that keeps the programs within half the SMs and each split two steps
    long. That is the best tiling H100 sweeps found at 64 rows for each of qwen3-0.6b's projections (K unsplit for
    qkv and gate_up, 64 and 96 programs; in four for o and down, 64 programs:
    ``experiments/h100-2026-11-26-decode-step/probe_call1.log``): more programs cost more in partial sums than
    they gain in bandwidth."""
    block_n, block_k = BLOCK_N, BLOCK_K
    tiles = cdiv(n, block_n)
    split = 1
    while 2 * tiles * split <= sm_count(device) // 2 and cdiv(k, block_k * split * 2) >= 2:
        split *= 2
    return LinearTiles(block_n, block_k, split)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, tickets_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, UPCAST: tl.constexpr, LIBDEVICE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    if SILU_AND_MUL:  # the tile's rows pair gate row j with up row N/2 + j: (2i, 2i + 1) -> output column j
        cols = pid_n * (BLOCK_N // 2) + r // 2
        n_ok = cols < N // 2
        w_row = (r % 2) * (N // 2) + cols
    else:
        cols = pid_n * BLOCK_N + r
        n_ok = cols < N
        w_row = cols
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    w_rows = w_ptr + w_row.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_cols + offs_k[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    if SPLIT_K > 1:
        # this tile's partials: [SPLIT_K, BLOCK_N, BLOCK_M] float32 in the workspace
        tile_base = ws_ptr + pid_n.to(tl.int64) * (SPLIT_K * BLOCK_N * BLOCK_M)
        local = r[:, None] * BLOCK_M + offs_m[None, :]
        tl.store(tile_base + pid_k * (BLOCK_N * BLOCK_M) + local, acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:  # the last of the tile's programs: sum the partials in split order
            acc = tl.load(tile_base + local, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                acc += tl.load(tile_base + s * (BLOCK_N * BLOCK_M) + local, cache_modifier=".cg")
            tl.atomic_xchg(tickets_ptr + pid_n, 0)  # reset for the next launch (or graph replay)
            _store(acc, b_ptr, y_ptr, w_row, cols, n_ok, offs_m, m_ok, stride_ym, BLOCK_N, BLOCK_M, HAS_BIAS,
                   SILU_AND_MUL, LIBDEVICE)
    else:
        _store(acc, b_ptr, y_ptr, w_row, cols, n_ok, offs_m, m_ok, stride_ym, BLOCK_N, BLOCK_M, HAS_BIAS,
               SILU_AND_MUL, LIBDEVICE)


@triton.jit
def _store(acc, b_ptr, y_ptr, w_row, cols, n_ok, offs_m, m_ok, stride_ym, BLOCK_N: tl.constexpr,
           BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, LIBDEVICE: tl.constexpr):
    """The transposed tile [BLOCK_N, BLOCK_M] to y[m, col], the bias added to the float32 sums (as cuBLAS's
    epilogue adds it), rounded once. With ``SILU_AND_MUL``, the (gate, up) row pairs rounded so, then
    ``silu_and_mul``'s numerics (``triton_layers.silu_mul``)."""
    dtype = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_row, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = acc.to(dtype)
    if SILU_AND_MUL:
        pairs = tl.permute(tl.reshape(out.to(tl.float32), (BLOCK_N // 2, 2, BLOCK_M)), (0, 2, 1))
        gate, up = tl.split(pairs)
        out = silu_mul(gate, up, dtype, LIBDEVICE)
        cols = tl.max(tl.reshape(cols, (BLOCK_N // 2, 2)), 1)  # each pair's column
        n_ok = tl.max(tl.reshape(n_ok.to(tl.int32), (BLOCK_N // 2, 2)), 1) > 0
    ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + cols[:, None]
    tl.store(ptrs, out, mask=n_ok[:, None] & m_ok[None, :])


# Output tiles a launch may have: the ticket counters one array per device holds; with ``choose_tiles``, a weight
# of up to MAX_WEIGHT_ROWS rows.
MAX_TILES = 4096
MAX_WEIGHT_ROWS = MAX_TILES * BLOCK_N
_TICKETS: dict[torch.device, torch.Tensor] = {}


def reserve(device: torch.device) -> None:
    """Allocate ``device``'s ticket counters, zeroed, if it has none yet. Call it outside a CUDA graph's capture
    before the first capture that launches the kernel: inside one, the allocation and its zeroing would be recorded
    into the graph rather than done, and another graph could replay first over counters that were never zeroed."""
    if device not in _TICKETS:
        _TICKETS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def reserved(device: torch.device) -> bool:
    return device in _TICKETS


def _tickets(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-tile counters of a device, zero between launches (each launch's last programs reset theirs).
    Kernels on one stream run in order, so one array serves every launch on it, graphs' replays included; launches
    on two streams at once would share counters (nothing of ours does that)."""
    if tiles > MAX_TILES:
        raise KernelArgumentError(f"skinny_linear: {tiles} output tiles, more than its {MAX_TILES} ticket counters")
    if device.type == "cuda" and not reserved(device) and torch.cuda.is_current_stream_capturing():
        raise KernelArgumentError("skinny_linear: no ticket counters on this device yet; call "
                                  "triton_linear.reserve(device) (or run the kernel once) before capturing a graph")
    reserve(device)
    return _TICKETS[device]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  silu_and_mul: bool = False, tiles: LinearTiles | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of at most ``MAX_ROWS`` rows (over its last dimension); with
    ``silu_and_mul``, SwiGLU's ``silu_and_mul`` of it (``weight`` is ``[gate | up]``, [2I, K] -> [..., I]), equal
    bit for bit to the two calls. 16-bit inputs on CUDA, any on the interpreter; ``tiles`` overrides
    ``choose_tiles`` (tests and tuning)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise KernelArgumentError(f"skinny_linear: input width {x.shape[-1]} does not match the weight's {k}")
    if silu_and_mul and n % 2:
        raise KernelArgumentError(f"skinny_linear: silu_and_mul needs a [gate | up] weight, got {n} rows (odd)")
    if x.is_cuda and not (x.dtype in DTYPES and weight.dtype == x.dtype):
        raise KernelArgumentError(f"skinny_linear takes fp16 or bf16 on CUDA, got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (n,):
        raise KernelArgumentError(f"skinny_linear: bias of shape {tuple(bias.shape)}, wanted ({n},)")
    m = math.prod(x.shape[:-1])
    if m > MAX_ROWS:
        raise KernelArgumentError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    if m == 0 or k == 0:  # nothing to launch: the rows are empty or sums of nothing (the bias alone)
        y = torch.nn.functional.linear(x, weight, bias)
        return triton_layers.silu_and_mul(y) if silu_and_mul else y
    rows = x.reshape(m, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()
    width = n // 2 if silu_and_mul else n
    y = torch.empty((*x.shape[:-1], width), dtype=weight.dtype, device=x.device)
    # The same tiles and splits with or without the activation: a tile then holds half as many output columns,
    # each computed as the plain layer computes it (the same K order), so the two agree bit for bit.
    t = tiles or choose_tiles(n, k, x.device)
    block_m = max(MIN_BLOCK_M, next_power_of_2(m))
    n_tiles = cdiv(n, t.block_n)
    k_per_split = cdiv(cdiv(k, t.split_k), t.block_k) * t.block_k
    split = t.split_k > 1  # else the workspace and the counters are placeholders, never touched
    ws = torch.empty(n_tiles * t.split_k * t.block_n * block_m, dtype=torch.float32, device=x.device) if split else rows
    tickets = _tickets(x.device, n_tiles) if split else rows
    y2 = y.view(m, width)
    launch(
        _linear_kernel, (n_tiles, t.split_k),
        rows, weight, weight if bias is None else bias, y2, ws, tickets,
        m, n, k, rows.stride(0), weight.stride(0), y2.stride(0), k_per_split,
        BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT_K=t.split_k, HAS_BIAS=bias is not None,
        SILU_AND_MUL=silu_and_mul, UPCAST=interpreter_upcast(x.device), LIBDEVICE=use_libdevice(x.device),
        **pdl_options(x.device), num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=False,
    )
    return y
