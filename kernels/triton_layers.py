"""Fused Triton kernels for the decoder's elementwise layers: RMSNorm (alone and after the
residual add), SwiGLU's activation, and rotary embedding with Qwen3's q/k norm.

Eager torch runs each of these as a chain of small kernels (a decode step launches tens per
layer); here each is one launch that reads its inputs once and writes its outputs once.

Numerics follow ``kernels.reference`` operation by operation: math in float32, and every value
torch rounds to a storage dtype is rounded here at the same point, in the same dtype. Floating
point contraction is off (torch runs each multiply and add as its own kernel, never as an FMA),
and on CUDA exp and rsqrt come from libdevice, the code torch's CUDA kernels call. bf16 results
then agree bit for bit with the reference on the GPU, except where a float32 sum's order
differs (RMSNorm's mean of squares): that moves a normed value by one unit in the last place
now and then (one element in tens of thousands; up to 2 ulps once times a weight below 1).
Launches depend on shapes alone: no host sync, capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.checks import (
    check_buffer, check_norm_args, check_norm_outputs, check_norm_width, check_rotary_args, check_silu_and_mul_args,
)
from kernels.triton_common import cdiv, launch, next_power_of_2, pdl_options, sm_count, wait_for_inputs

# Widest row the RMSNorm holds in registers (16 warps, 64 float32 values per thread).
MAX_NORM_COLS = 32768
# Elements a norm program holds when it packs several rows, and a rotary program's tile.
_NORM_TILE = 4096
_ROPE_TILE = 1024
# Columns of one silu_and_mul program.
_SILU_BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def use_libdevice(device: torch.device) -> bool:
    """libdevice's exp and rsqrt on CUDA; Triton 3.6's interpreter has no libdevice and
    computes ``tl.exp`` / ``tl.math.rsqrt`` with numpy instead."""
    return device.type == "cuda"


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _rsqrt(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.rsqrt(x)
    else:
        y = tl.math.rsqrt(x)
    return y


# -- RMSNorm, with the residual add ------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, n_cols,
    stride_x, stride_r, stride_o, stride_ro, eps, inv_cols,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    if RESIDUAL:
        # torch's ``residual + x``: one add, rounded to the promoted dtype.
        r = tl.load(res_ptr + rows * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + rows * stride_ro + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = _rsqrt(tl.sum(xf * xf, axis=1) * inv_cols + eps, LIBDEVICE)
    normed = (xf * rstd[:, None]).to(x.dtype)  # rounded to the input dtype before the weight
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    out = w.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(out_ptr + rows * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels index within a row with unit stride; copy only a tensor that lacks it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``[rows, last]`` view (a copy only when no view has unit column stride)."""
    return _unit_stride(x.reshape(-1, x.shape[-1]))


def norm_rows_per_program(n_rows: int, block: int, device: torch.device) -> int:
    """One row per program while the grid is short of four programs per SM (decode batches);
    more rows, up to a tile of ``_NORM_TILE`` elements, once the rows outnumber that (prefill,
    narrow rows), so each program moves enough bytes to amortize its start."""
    wanted = cdiv(n_rows, 4 * sm_count(device))
    return min(max(1, _NORM_TILE // block), next_power_of_2(wanted))


def _launch_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
    summed: torch.Tensor | None, eps: float,
) -> None:
    """RMSNorm of ``x`` into ``out``, or of ``residual + x``, which then also goes to ``summed``."""
    if x.numel() == 0:
        return
    width = x.shape[-1]
    x2 = _as_rows(x)
    n_rows = x2.shape[0]
    res2 = x2 if residual is None else _as_rows(residual)  # placeholder when there is no residual
    out2 = out.view(n_rows, width)
    summed2 = out2 if summed is None else summed.view(n_rows, width)
    block = next_power_of_2(width)
    rows = norm_rows_per_program(n_rows, block, x.device)
    launch(
        _rms_norm_kernel, (cdiv(n_rows, rows),),
        x2, res2, weight, out2, summed2, n_rows, width,
        x2.stride(0), res2.stride(0), out2.stride(0), summed2.stride(0), eps, 1.0 / width,
        ROWS=rows, BLOCK=block, RESIDUAL=residual is not None, LIBDEVICE=use_libdevice(x.device),
        **pdl_options(x.device),
        num_warps=min(16, max(1, rows * block // 256)), enable_fp_fusion=False,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (see ``kernels.reference.rms_norm``), one launch."""
    check_norm_args(x, weight)
    check_norm_width(x.shape[-1], MAX_NORM_COLS)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch_norm(x, None, weight, out, None, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)`` in one launch that reads x and residual once: new tensors, or
    the given buffers (``residual_out`` may be ``residual``: each program reads its rows before it writes them)."""
    check_norm_args(x, weight, residual)
    check_norm_width(x.shape[-1], MAX_NORM_COLS)
    summed_dtype = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(weight.dtype, summed_dtype)
    check_norm_outputs(x, (out_dtype, summed_dtype), out, residual_out)
    summed = torch.empty(x.shape, dtype=summed_dtype, device=x.device) if residual_out is None else residual_out
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device) if out is None else out
    _launch_norm(x, residual, weight, out, summed, eps)
    return out, summed


# -- SwiGLU activation --------------------------------------------------------------------------


@triton.jit
def silu_mul(gate, up, DTYPE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """``silu(gate) * up`` of float32 values rounded from ``DTYPE``, in torch's numerics: silu as x / (1 + exp(-x)) in
    float32 with an IEEE division, rounded to ``DTYPE``; then the product, rounded. Shared by ``silu_and_mul`` and
    the decode GEMM's SwiGLU epilogue (``triton_linear``), which must agree bit for bit."""
    act = tl.math.div_rn(gate, 1.0 + _exp(-gate, LIBDEVICE)).to(DTYPE)
    return (act.to(tl.float32) * up).to(DTYPE)


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr, out_ptr, n_cols, stride_in, stride_out, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptrs = gate_up_ptr + row * stride_in + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, silu_mul(gate, up, out_ptr.dtype.element_ty, LIBDEVICE), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] ([..., 2I] -> [..., I]), one launch."""
    check_silu_and_mul_args(gate_up)
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.numel() == 0:
        return out
    rows = _as_rows(gate_up)
    out2 = out.view(-1, inter)
    block = min(_SILU_BLOCK, next_power_of_2(inter))
    launch(
        _silu_and_mul_kernel, (rows.shape[0], cdiv(inter, block)),
        rows, out2, inter, rows.stride(0), out2.stride(0),
        BLOCK=block, LIBDEVICE=use_libdevice(gate_up.device), **pdl_options(gate_up.device),
        num_warps=4, enable_fp_fusion=False,
    )
    return out


# -- rotary embedding with the q/k norm -------------------------------------------------------------


@triton.jit
def _rope_heads(
    src, dst, w_ptr, cos, sin, num_heads, head0, stride_h, dst_stride_h, eps, inv_dim,
    HEADS: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    NORM: tl.constexpr, NORM_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """Heads ``head0 .. head0 + HEADS`` of one token: optional RMSNorm, then rotate-half RoPE, rounded to
    ``OUT_DTYPE`` and stored in ``dst``'s dtype (a cache's, if it differs). Each head is handled as its two
    halves, so the rotation needs no shuffle."""
    heads = head0 + tl.arange(0, HEADS)
    dims = tl.arange(0, HALF_P)
    dim_ok = dims < HALF
    mask = (heads < num_heads)[:, None] & dim_ok[None, :]
    ptrs = src + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    if NORM:
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        rstd = _rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) * inv_dim + eps, LIBDEVICE)[:, None]
        w1 = tl.load(w_ptr + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1f * rstd).to(x1.dtype).to(tl.float32)).to(NORM_DTYPE)
        x2 = (w2 * (x2f * rstd).to(x2.dtype).to(tl.float32)).to(NORM_DTYPE)
    # q * cos + rotate_half(q) * sin, each product and the sum rounded to the output dtype.
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    o1 = (x1f * cos).to(OUT_DTYPE).to(tl.float32) + (-x2f * sin).to(OUT_DTYPE).to(tl.float32)
    o2 = (x2f * cos).to(OUT_DTYPE).to(tl.float32) + (x1f * sin).to(OUT_DTYPE).to(tl.float32)
    out_ptrs = dst + heads[:, None] * dst_stride_h + dims[None, :]
    tl.store(out_ptrs, o1.to(OUT_DTYPE).to(dst.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + HALF, o2.to(OUT_DTYPE).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, q_out_ptr, k_out_ptr, v_out_ptr, slot_ptr,
    num_q_heads, num_kv_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ko, stride_koh, stride_vo, stride_voh, stride_cs, eps, inv_dim,
    HEADS: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    NORM: tl.constexpr, NORM_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, CACHE: tl.constexpr,
    LIBDEVICE: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (tokens, head blocks of q then of k): q and k in one launch, one cos/sin row per token. With
    ``CACHE`` the k blocks store their rows, and copy the same heads of v, into the cache's slot of the token
    (``write_kv``'s store; a negative slot is padding, skipped); else k goes to ``k_out`` row ``t``."""
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, HEADS)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dims = tl.arange(0, HALF_P)
    dim_ok = dims < HALF
    table = cos_sin_ptr + pos * stride_cs + dims
    cos = tl.load(table, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(table + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    if block < q_blocks:
        _rope_heads(q_ptr + t * stride_qt, q_out_ptr + t * num_q_heads * (2 * HALF), q_w_ptr, cos, sin,
                    num_q_heads, block * HEADS, stride_qh, 2 * HALF, eps, inv_dim,
                    HEADS, HALF, HALF_P, NORM, NORM_DTYPE, OUT_DTYPE, LIBDEVICE)
    else:
        row = t
        if CACHE:
            row = tl.load(slot_ptr + t).to(tl.int64)
        if row >= 0:
            head0 = (block - q_blocks) * HEADS
            _rope_heads(k_ptr + t * stride_kt, k_out_ptr + row * stride_ko, k_w_ptr, cos, sin,
                        num_kv_heads, head0, stride_kh, stride_koh, eps, inv_dim,
                        HEADS, HALF, HALF_P, NORM, NORM_DTYPE, OUT_DTYPE, LIBDEVICE)
            if CACHE:
                heads = head0 + tl.arange(0, HEADS)
                full = tl.arange(0, 2 * HALF_P)
                mask = (heads < num_kv_heads)[:, None] & (full < 2 * HALF)[None, :]
                value = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + full[None, :], mask=mask)
                tl.store(v_out_ptr + row * stride_vo + heads[:, None] * stride_voh + full[None, :],
                         value.to(v_out_ptr.dtype.element_ty), mask=mask)


def _rotary_launch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None, q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q's rotated copy (into ``q_out`` if given), and k's (None when ``cache`` = (v, k_cache, v_cache,
    slot_mapping) takes k and v)."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    norm = q_norm_weight is not None
    norm_dtype = torch.promote_types(q_norm_weight.dtype, q.dtype) if norm else q.dtype
    out_dtype = torch.promote_types(norm_dtype, cos_sin.dtype)
    if q_out is None:
        q_out = torch.empty((tokens, num_q_heads, head_dim), dtype=out_dtype, device=q.device)
    else:
        check_buffer("q_out", q_out, (tokens, num_q_heads, head_dim), out_dtype, q.device)
    if cache is None:
        k_out = torch.empty((tokens, num_kv_heads, head_dim), dtype=out_dtype, device=q.device)
        v, v_out, slots = k, k_out, positions  # placeholders the kernel never touches
    else:
        k_out = None
        v, k_cache, v_out, slots = cache
    if tokens == 0 or head_dim == 0:
        return q_out, k_out
    q, k, v, cos_sin = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(cos_sin)
    k_dst = k_cache if cache is not None else k_out
    half = head_dim // 2
    half_p = next_power_of_2(half)
    heads = min(next_power_of_2(max(num_q_heads, num_kv_heads)), max(1, _ROPE_TILE // (2 * half_p)))
    grid = (tokens, cdiv(num_q_heads, heads) + cdiv(num_kv_heads, heads))
    launch(
        _rotary_kernel, grid,
        positions, q, k, v, cos_sin, q_norm_weight if norm else q, k_norm_weight if norm else k, q_out, k_dst,
        v_out, slots, num_q_heads, num_kv_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_dst.stride(0), k_dst.stride(1), v_out.stride(0), v_out.stride(1),
        cos_sin.stride(0), eps, 1.0 / head_dim,
        HEADS=heads, HALF=half, HALF_P=half_p, NORM=norm, NORM_DTYPE=_TL_DTYPES[norm_dtype],
        OUT_DTYPE=_TL_DTYPES[out_dtype], CACHE=cache is not None, LIBDEVICE=use_libdevice(q.device),
        **pdl_options(q.device), num_warps=min(4, max(1, heads * half_p // 128)), enable_fp_fusion=False,
    )
    return q_out, k_out


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm, then rotate-half RoPE, of q and k in one launch (see
    ``kernels.reference.rotary_embedding``). q and k may be strided views (of a fused qkv
    projection, say) as long as their last dimension is contiguous; the results are new
    contiguous tensors. Positions are not bounds-checked on the device (that would sync):
    each must index a row of ``cos_sin``."""
    check_rotary_args(positions, q, k, cos_sin, q_norm_weight, k_norm_weight)
    return _rotary_launch(positions, q, k, cos_sin, q_norm_weight, k_norm_weight, eps, None)


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rotary_embedding`` then ``write_kv`` of the rotated k and of v, in one launch: returns the rotated q (in
    ``q_out``, a contiguous buffer, if given). Launch without the cache's checks (``kernels.triton_ops
    .rotary_write_kv`` makes them)."""
    check_rotary_args(positions, q, k, cos_sin, q_norm_weight, k_norm_weight)
    return _rotary_launch(positions, q, k, cos_sin, q_norm_weight, k_norm_weight, eps,
                          (v, k_cache, v_cache, slot_mapping), q_out)[0]
