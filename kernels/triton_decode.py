"""Split-KV (flash-decoding) attention for one query token per sequence.

Grid ``(batch, kv_heads, splits)``: each program loads its KV head's keys and values once
for all the query heads that share it (GQA/MQA), over one slice of the context: every
``splits``-th tile of it. With more than one split, a second kernel merges the slices by
their log-sum-exp. The number of splits depends only on shapes and host ints, and each
sequence's length is read on the device from ``seq_lens``, so a launch never syncs and can
be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
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
    next_power_of_2,
    pdl_options,
    sequence_base,
    sm_count,
    tile_blocks,
    wait_for_inputs,
)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    # Triton ``num_stages``, the same for both addressings: the kernel loads the block-table
    # entries one tile ahead itself (``triton_common.attend_tiles``), so paging needs no pipeline stage of its own.
    num_stages: int
    # Programs to aim for per SM when choosing the split count: enough to hide a wave tail.
    waves: int = 3
    # A split covers at least this many tiles, so the merge costs less than it saves, unless
    # that leaves SMs idle (see ``num_kv_splits``).
    min_tiles_per_split: int = 4


@functools.lru_cache(maxsize=None)
def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    """Tile shape for ``head_dim``: 16 KiB of K (and as much V) per tile on the GPU, 8 KiB for
    fp32, whose split tf32 products need more registers."""
    if device.type != "cuda":
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1)
    budget = 4096 if dtype == torch.float32 else 8192
    # One K/V tile in flight ahead of the one in use: with 4-5 programs per SM that saturates
    # an H100's memory, and a deeper pipeline only costs occupancy (shared memory).
    return DecodeConfig(block_n=max(16, min(128, budget // head_dim)), num_warps=4, num_stages=2)


def num_kv_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int, config: DecodeConfig) -> int:
    """Splits per sequence so that ``batch * num_kv_heads * splits`` fills the device, rounded up to a power of two.

    Splits of ``min_tiles_per_split`` tiles or more, unless those would make fewer programs
    than SMs: a program's tiles are then a chain of memory round trips that no other program
    overlaps, and splits of one tile each are faster for both addressings (H100, paged and
    contiguous alike: batch 1 ctx 512, 14.8 -> 10.3 µs with 8 splits instead of 2; batch 4
    ctx 512, 16.7 -> 13.7 µs). Where four-tile splits already give every SM a program, the
    shorter ones cost time (batch 16 ctx 512: 4 splits 26.2 µs, 2 splits 24.8 µs).

    The count is then rounded up to a power of two (within that bound), so that a power-of-two number of tiles
    divides evenly and no split carries a tile more than the others: over 24 shapes (batch 1-128, context 1,024-16,384,
    CUDA-graph replays on an H100), 7 splits at batch 8 x 4,096 took 53.6 µs contiguous where 8 took 50.5, and 50
    splits at batch 1 x 4,096 8.7 µs where 64 took 8.0. Rounded so, the slower addressing took on average 3.6% longer
    than at the fastest count measured for it, against 5.2% unrounded (experiments/h100-2026-11-27-launch/). Those
    were 20 calls back to back, which read a cache under 50 MB from L2; timed one call at a time with L2 flushed, as
    an engine step reads each layer's cache, the rule is 1.0% over the fastest count on average and 5.6% at worst
    (batch 16 x 1,024, where 2 splits beat its 4), so it stays (experiments/h100-2026-11-27-closing/)."""
    programs = max(1, batch * num_kv_heads)
    wanted = cdiv(config.waves * num_sms, programs)
    tiles = cdiv(max(1, max_seq_len), config.block_n)
    useful = cdiv(tiles, config.min_tiles_per_split)
    if programs * useful < num_sms:
        useful = tiles
    return max(1, min(next_power_of_2(min(wanted, useful)), useful))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, addr_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, num_splits, row_tokens, window,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ob, stride_oh, stride_addr,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr,
    WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Split ``split`` attends to the tiles ``split, split + num_splits, ...`` of its sequence:
    # where its first tile lies does not depend on ``seq_len``, so (paged) that tile's
    # block-table entries are loaded alongside ``seq_len`` rather than after it, masked only by
    # the table's row (``row_tokens``). The K/V copies of the first tile then wait on one memory
    # access, as contiguous addressing's wait on ``seq_len`` and the sequence's start slot.
    offs = tl.arange(0, BLOCK_N)
    step = num_splits * BLOCK_N
    table, start_slot = sequence_base(addr_ptr, b, stride_addr, PAGED)
    if WINDOWED:  # the tiles start at the window's first key: where depends on seq_len
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        lo = tl.maximum(seq_len - window, 0)
        first = lo // BLOCK_N * BLOCK_N + split * BLOCK_N
        blocks = tile_blocks(table, first + offs, first + offs < row_tokens, BLOCK_SIZE, PAGED)
    else:
        lo = 0
        first = split * BLOCK_N
        blocks = tile_blocks(table, first + offs, first + offs < row_tokens, BLOCK_SIZE, PAGED)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)

    rows = tl.arange(0, GROUP_P)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    acc, m_i, l_i, blocks = attend_tiles(
        q, acc, m_i, l_i, blocks, k_base, v_base, table, start_slot, first, seq_len, step, seq_len, rows, lo, window,
        stride_ks, stride_vs, qk_scale,
        BLOCK_N, HEAD_DIM, BLOCK_SIZE, PAGED, True, False, WINDOWED, UPCAST, PRECISION,
    )

    # An empty slice (or an empty sequence) leaves l_i == 0: it contributes nothing.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        idx = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_out_ptr + idx[:, None] * HEAD_DIM + dims[None, :], o, mask=row_ok[:, None])
        tl.store(part_lse_ptr + idx, lse, mask=row_ok)
    else:
        out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_P: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, HEAD_DIM)
    ok = splits < num_splits
    idx = (b * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + idx, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.math.exp2(lse - top)
    parts = tl.load(part_out_ptr + idx[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(weight, 0)
    o = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    addr: torch.Tensor,
    *,
    paged: bool,
    block_size: int,
    scale: float,
    max_seq_len: int,
    window: int | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch without checks. ``addr`` is the block table (paged) or ``seq_starts``.

    ``max_seq_len`` (a host-side bound) only caps the split count; ``window``: a sliding window (None: none),
    whose keys, one tile more at most, are all a split covers; ``num_splits`` and ``config`` override the
    heuristics (tests and tuning).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    device = q.device
    config = config or decode_config(head_dim, q.dtype, device)
    if num_splits is None:
        span = max_seq_len if not window else min(max_seq_len, window + config.block_n)
        num_splits = num_kv_splits(batch, num_kv_heads, span, sm_count(device), config)
    if out is None:  # else the caller's [B, Hq, D] view (unit stride in D), written in place
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=device)
    if batch == 0:
        return out
    split = num_splits > 1
    part_out = part_lse = out  # placeholders, never touched when not split
    if split:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device)
    # Strides as tuples: this runs on every eager call, where each call of ``stride(i)`` costs the host.
    q_stride, k_stride, v_stride, o_stride = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    launch(
        _decode_split_kernel, (batch, num_kv_heads, num_splits),
        q, k_cache, v_cache, seq_lens, addr, out, part_out, part_lse,
        scale * LOG2E, num_splits, addr.shape[1] * block_size if paged else 0, window or 0,
        q_stride[0], q_stride[1], k_stride[0], k_stride[1], v_stride[0], v_stride[1], o_stride[0], o_stride[1],
        addr.stride(0),
        GROUP=group, GROUP_P=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=config.block_n, BLOCK_SIZE=block_size if paged else 1, PAGED=paged, SPLIT=split,
        WINDOWED=bool(window), UPCAST=interpreter_upcast(device), PRECISION=dot_precision(q.dtype),
        **pdl_options(device), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        launch(
            _decode_merge_kernel, (batch, num_heads),
            part_out, part_lse, out, num_splits, o_stride[0], o_stride[1],
            HEAD_DIM=head_dim, SPLITS_P=next_power_of_2(num_splits), **pdl_options(device), num_warps=4,
        )
    return out
