"""Triton backend: the functions, signatures and layout of ``kernels.reference``, for CUDA.

Every function checks shapes, dtypes and strides on the host (no device sync). With
``validate=True`` it also runs the reference's checks, which read the block tables and
lengths back from the device. With ``validate=False`` nothing syncs and no host logic
depends on tensor values: grids and split counts follow from shapes and the host-side
bounds ``max_seq_len`` / ``max_query_len``, so decode can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels import reference, triton_cache, triton_common, triton_decode, triton_linear, triton_prefill
from kernels import triton_layers
from kernels.triton_layers import add_rms_norm, rms_norm, rotary_embedding, silu_and_mul  # noqa: F401
from kernels.checks import (
    check_addressing_mode,
    check_out,
    check_attention_args,
    check_blocks_disjoint,
    check_cache_planes,
    check_copy_args,
    check_query,
    check_swap_pair,
    check_triton_cache,
    check_write_args,
    check_write_shapes,
)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels index rows with unit stride; copy only a tensor that lacks it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _checked_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """An output view the kernels can write: q's shape and dtype, unit stride in the head dim."""
    if out is not None:
        check_out(out, q)
    return out


def _check_write(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, validate: bool) -> None:
    """A K/V write's shapes and cache layout; with ``validate`` also its slots (a device sync)."""
    (check_write_args if validate else check_write_shapes)(key, value, k_cache, v_cache, slot_mapping)
    check_triton_cache(k_cache, v_cache)


def _addressing(block_tables: torch.Tensor | None, seq_starts: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    return (block_tables, True) if block_tables is not None else (seq_starts, False)


def seq_len_bound(
    k_cache: torch.Tensor, block_tables: torch.Tensor | None, block_size: int, max_seq_len: int | None
) -> int:
    """An upper bound of ``seq_lens`` from shapes alone: a sequence fits its block-table row
    (paged) and the cache; ``max_seq_len`` tightens it."""
    bound = k_cache.shape[0]
    if block_tables is not None:
        bound = min(bound, block_tables.shape[1] * block_size)
    return bound if max_seq_len is None else min(bound, max_seq_len)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_tables: torch.Tensor | None = None,
    seq_starts: torch.Tensor | None = None,
    block_size: int = 1,
    scale: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    window: int | None = None,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention over the cache (see ``kernels.reference.prefill_attention``; ``window``: sliding;
    ``out``: where to write it, a [T, Hq, D] view with unit stride in D, else a new tensor).

    ``max_query_len`` sizes the grid; without it the grid covers ``q.shape[0]`` tokens per
    sequence (or the exact longest query when ``validate`` already syncs). ``max_seq_len``, a
    bound of ``seq_lens`` (else one from the shapes, or the exact longest when ``validate``
    syncs), picks the tile shape (``triton_prefill.prefill_config``); the kernel reads the
    lengths themselves on the device."""
    check_query(q, k_cache, v_cache)
    check_triton_cache(k_cache, v_cache)
    check_addressing_mode(block_tables, seq_starts, block_size)
    if validate:
        check_attention_args(q, k_cache, v_cache, seq_lens, block_tables, seq_starts, block_size, query_start_loc)
        if max_query_len is None and query_start_loc.shape[0] > 1:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if max_seq_len is None and seq_lens.numel():
            max_seq_len = int(seq_lens.max())
    addr, paged = _addressing(block_tables, seq_starts)
    return triton_prefill.prefill(
        _unit_stride(q), k_cache, v_cache, query_start_loc, seq_lens, addr,
        paged=paged, block_size=block_size, scale=q.shape[-1] ** -0.5 if scale is None else scale,
        max_query_len=q.shape[0] if max_query_len is None else max_query_len,
        max_seq_len=seq_len_bound(k_cache, block_tables, block_size, max_seq_len), window=window,
        out=_checked_out(out, q),
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_tables: torch.Tensor | None = None,
    seq_starts: torch.Tensor | None = None,
    block_size: int = 1,
    scale: float | None = None,
    max_seq_len: int | None = None,
    window: int | None = None,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence (see ``kernels.reference.decode_attention``; ``window``: sliding;
    ``out``: as ``prefill_attention``'s), split-KV.

    ``max_seq_len`` only caps the number of KV splits; the split bounds come from
    ``seq_lens`` on the device. A sequence of length 0 (a padding row of a CUDA-graph
    batch) gets a zero output."""
    check_query(q, k_cache, v_cache)
    check_triton_cache(k_cache, v_cache)
    check_addressing_mode(block_tables, seq_starts, block_size)
    if validate:
        query_start_loc = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
        check_attention_args(q, k_cache, v_cache, seq_lens, block_tables, seq_starts, block_size, query_start_loc)
    addr, paged = _addressing(block_tables, seq_starts)
    return triton_decode.decode(
        _unit_stride(q), k_cache, v_cache, seq_lens, addr,
        paged=paged, block_size=block_size, scale=q.shape[-1] ** -0.5 if scale is None else scale,
        max_seq_len=seq_len_bound(k_cache, block_tables, block_size, max_seq_len), window=window,
        out=_checked_out(out, q),
    )


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
    *,
    validate: bool = True,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rotary_embedding`` of q and k, then ``write_kv`` of k and v, in one launch (see
    ``kernels.reference.rotary_write_kv``): returns the rotated q (in ``q_out`` if given)."""
    _check_write(k, v, k_cache, v_cache, slot_mapping, validate)
    return triton_layers.rotary_write_kv(positions, q, k, v, cos_sin, q_norm_weight, k_norm_weight, eps,
                                         k_cache, v_cache, slot_mapping, q_out)


def _skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a linear layer takes ``triton_linear.skinny_linear``: while a CUDA graph is captured on a GPU whose
    kernels launch as programmatic dependents (sm_90 and later), for 16-bit inputs of at most
    ``triton_linear.MAX_ROWS`` rows (a decode step's). What it saves is its launches' overlap with their neighbours'
    on the device, which shows where the graph's replay keeps the host off the critical path; eager steps, where a
    Triton launch costs the host more than a cuBLAS call (23-35 µs each through Triton's own path,
    experiments/h100-2026-11-26-roofline/; less through ``triton_common.launch``'s direct one, not measured for this
    kernel), keep cuBLAS. The two round differently, so a replayed step and an eager one of the same rows may differ
    in the last bits (docs/methodology.md, "What a comparison holds equal"). An eager call that a capture would give
    the kernel reserves the kernel's ticket counters (``triton_linear.reserve``): graphs are captured after eager
    warm-up runs of the same shapes, and a capture must not allocate them. A capture that finds none (no warm-up)
    keeps cuBLAS."""
    if not (x.is_cuda and x.numel() <= triton_linear.MAX_ROWS * x.shape[-1]
            and x.dtype in triton_linear.DTYPES and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and weight.shape[0] <= triton_linear.MAX_WEIGHT_ROWS
            and triton_common.programmatic_launch(x.device)):
        return False
    if torch.cuda.is_current_stream_capturing():
        return triton_linear.reserved(x.device)
    triton_linear.reserve(x.device)
    return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``: cuBLAS (``torch.nn.functional.linear``), or our kernel where ``_skinny`` says."""
    if _skinny(x, weight, bias):
        return triton_linear.skinny_linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(linear(x, weight, bias))`` (see the reference): where ``_skinny`` says, one launch of our
    kernel with the activation in its epilogue (bit for bit the two calls); else cuBLAS, then ``silu_and_mul``."""
    if _skinny(x, weight, bias):
        return triton_linear.skinny_linear(x, weight, bias, silu_and_mul=True)
    return silu_and_mul(reference.linear(x, weight, bias))


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Store new K/V rows at ``slot_mapping``; a negative slot is padding, skipped."""
    _check_write(key, value, k_cache, v_cache, slot_mapping, validate)
    triton_cache.write_kv(_unit_stride(key), _unit_stride(value), k_cache, v_cache, slot_mapping)



def repeatable(attend: Callable[[torch.Tensor, torch.Tensor], object], k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """Run ``attend(k_cache, v_cache)`` (one layer's attention calls) and return what runs the same launches over
    another layer's cache planes, through the compiled kernels (``triton_common.repeater``): a decode call of two
    launches repeated so cost the host 16 µs against 60 for a call of the wrapper (H100 host,
    experiments/h100-2026-11-27-launch/). Every other argument is reused as it is, so ``attend`` must read buffers
    the caller refills between repeats, not copies it makes (as the piecewise graphs' queries and outputs are).
    Where the launches cannot be repeated so (the interpreter), it returns ``attend``."""
    with triton_common.recording() as launches:
        attend(k_cache, v_cache)
    return triton_common.repeater(launches, (k_cache, v_cache)) or attend

def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer (copy-on-write); the blocks of
    ``dst`` must not appear in ``src`` (they are copied in parallel)."""
    check_copy_args(kv_cache, src, dst, block_size)
    check_cache_planes(kv_cache)
    check_blocks_disjoint(src, dst)
    triton_cache.copy_blocks(kv_cache, kv_cache, src.to(kv_cache.device), dst.to(kv_cache.device), block_size)


def _gpu_addressable(x: torch.Tensor) -> bool:
    return x.is_cuda or (x.device.type == "cpu" and x.is_pinned())


def swap_blocks(
    src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int
) -> None:
    """Copy blocks ``src[i]`` of one cache to blocks ``dst[i]`` of another (GPU <-> pinned CPU).

    With a CUDA cache on one side and a CUDA or pinned CPU cache on the other, one kernel
    moves the blocks through unified addressing, ordered on the current stream: a swap-out
    is complete before any later kernel on that stream reuses the GPU blocks, and the host
    must synchronize that stream before it reads the CPU copy itself. Pageable CPU memory is
    beyond the GPU's reach: that case falls back to the reference's torch indexing."""
    check_copy_args(src_cache, src, src, block_size)
    check_copy_args(dst_cache, dst, dst, block_size)
    check_swap_pair(src_cache, dst_cache)
    gpu = src_cache if src_cache.is_cuda else dst_cache
    if not (gpu.is_cuda and _gpu_addressable(src_cache) and _gpu_addressable(dst_cache)):
        reference.swap_blocks(src_cache, dst_cache, src, dst, block_size)
        return
    check_cache_planes(src_cache)
    check_cache_planes(dst_cache)
    with torch.cuda.device(gpu.device):
        triton_cache.copy_blocks(src_cache, dst_cache, src.to(gpu.device), dst.to(gpu.device), block_size)
