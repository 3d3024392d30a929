"""Varlen causal attention for prefill and chunked prefill, reading keys and values from the cache.

Grid ``(query_heads, query_tiles, batch)``: heads vary fastest so the query heads of one
KV head run side by side and share its tiles in L2, and the heaviest (last) query tiles
start first. The ``q_len`` new tokens of a sequence are its last positions: a tile sees
every earlier key unmasked, and only the tiles on its diagonal pay for the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_common import (
    LOG2E,
    attend_tiles,
    cdiv,
    dot_precision,
    interpreter_upcast,
    launch,
    pdl_options,
    sequence_base,
    tile_blocks,
    wait_for_inputs,
)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int  # Triton's, the same for both addressings (see ``triton_common.attend_tiles``)


# Keys per sequence (a host-side bound) up to which 16-bit prefill takes the small tile.
SHORT_SEQUENCE = 1024


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device, max_seq_len: int | None = None
                   ) -> PrefillConfig:
    """Tile shape for ``head_dim`` and the longest sequence, from the compiler's register report for sm_90 (no
    spills for 16-bit types; fp32's split tf32 products get small tiles and still spill a little) and H100 sweeps
    (``python -m kernels.bench --sections tune``; ``experiments/h100-2026-11-26-roofline/``, and for both
    addressings at seven tiles ``experiments/h100-2026-11-27-prefill/``). For 16-bit types and head_dim <= 128,
    sequences of at most ``SHORT_SEQUENCE`` keys take 64 x 32 tiles: a query tile then has few key tiles to loop
    over, and more, smaller programs fill the device (16 x 512: 149 µs contiguous and 162 µs paged against 187 and
    205 with 128 x 128 tiles). Longer ones take 128 x 128 tiles three K/V stages deep (1 x 4,096: 317 and 347 µs,
    against 334 and 374 two deep). The choice depends on shapes alone, never on the addressing: both compile with
    the same options."""
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return PrefillConfig(64, 32, 4, 2) if head_dim <= 128 else PrefillConfig(32, 32, 4, 1)
    if head_dim <= 128:
        if max_seq_len is not None and max_seq_len <= SHORT_SEQUENCE:
            return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, query_start_ptr, seq_lens_ptr, addr_ptr, qk_scale, window,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_addr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b).to(tl.int32)
    q_len = tl.load(query_start_ptr + b + 1).to(tl.int32) - q_start
    m0 = tile * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    context = seq_len - q_len

    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = context + rows
    kv_head = head // GROUP
    table, start_slot = sequence_base(addr_ptr, b, stride_addr, PAGED)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    diag_end = tl.minimum(context + m0 + BLOCK_M, seq_len)
    if WINDOWED:
        # A sliding window: keys from the first one the tile's first row sees, every tile masked.
        lo = tl.maximum(context + m0 - window + 1, 0)
        first = lo // BLOCK_N * BLOCK_N
        blocks = tile_blocks(table, first + offs, first + offs < diag_end, BLOCK_SIZE, PAGED)
        acc, m_i, l_i, blocks = attend_tiles(
            q, acc, m_i, l_i, blocks, k_base, v_base, table, start_slot, first, diag_end, BLOCK_N, diag_end,
            q_pos, lo, window, stride_ks, stride_vs, qk_scale,
            BLOCK_N, HEAD_DIM, BLOCK_SIZE, PAGED, True, True, True, UPCAST, PRECISION,
        )
    else:
        # Keys before the tile's first query position are visible to every row: no mask. Only the tiles on the
        # diagonal pay for it; they start where the unmasked ones end, with the entries those loaded ahead.
        full_end = (context + m0) // BLOCK_N * BLOCK_N
        blocks = tile_blocks(table, offs, offs < seq_len, BLOCK_SIZE, PAGED)
        acc, m_i, l_i, blocks = attend_tiles(
            q, acc, m_i, l_i, blocks, k_base, v_base, table, start_slot, 0, full_end, BLOCK_N, seq_len,
            q_pos, 0, 0, stride_ks, stride_vs, qk_scale,
            BLOCK_N, HEAD_DIM, BLOCK_SIZE, PAGED, False, False, False, UPCAST, PRECISION,
        )
        acc, m_i, l_i, blocks = attend_tiles(
            q, acc, m_i, l_i, blocks, k_base, v_base, table, start_slot, full_end, diag_end, BLOCK_N, diag_end,
            q_pos, 0, 0, stride_ks, stride_vs, qk_scale,
            BLOCK_N, HEAD_DIM, BLOCK_SIZE, PAGED, True, True, False, UPCAST, PRECISION,
        )

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    addr: torch.Tensor,
    *,
    paged: bool,
    block_size: int,
    scale: float,
    max_query_len: int,
    max_seq_len: int | None = None,
    window: int | None = None,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch without checks. ``addr`` is the block table (paged) or ``seq_starts``;
    ``max_query_len`` (a host-side bound) sizes the grid, ``max_seq_len`` (another, or None) picks the tile;
    ``window``: a sliding window (None: none)."""
    tokens, num_heads, head_dim = q.shape
    batch = query_start_loc.shape[0] - 1
    device = q.device
    config = config or prefill_config(head_dim, q.dtype, device, max_seq_len)
    if out is None:  # else the caller's [T, Hq, D] view (unit stride in D), written in place
        out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=device)
    if tokens == 0 or batch == 0 or max_query_len <= 0:
        return out
    grid = (num_heads, cdiv(max_query_len, config.block_m), batch)
    q_stride, k_stride, v_stride, o_stride = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    launch(
        _prefill_kernel, grid,
        q, k_cache, v_cache, out, query_start_loc, seq_lens, addr, scale * LOG2E, window or 0,
        q_stride[0], q_stride[1], k_stride[0], k_stride[1], v_stride[0], v_stride[1], o_stride[0], o_stride[1],
        addr.stride(0),
        GROUP=num_heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size if paged else 1, PAGED=paged, WINDOWED=bool(window),
        UPCAST=interpreter_upcast(device), PRECISION=dot_precision(q.dtype),
        **pdl_options(device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
