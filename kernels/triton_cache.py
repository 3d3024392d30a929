"""KV-cache maintenance kernels: the write of new K/V rows into their slots, and block copies.

One copy kernel serves copy-on-write inside a cache and swaps between the GPU cache and a
pinned CPU cache: pinned host memory is mapped into the GPU's address space (unified
addressing), so the GPU gathers from one cache and scatters into the other over PCIe in a
single stream-ordered launch, with no staging buffer and no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import cdiv, launch, next_power_of_2, pdl_options, wait_for_inputs

# Elements each copy program moves: 16 KiB of bf16.
_COPY_CHUNK = 8192
# Elements of one token's K (or V) each write program stores at most.
_WRITE_TILE = 4096


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ks, stride_kch, stride_vs, stride_vch,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_heads)[:, None]
    row = heads[:, None]
    key = tl.load(key_ptr + t * stride_kt + row * stride_kh + dims[None, :], mask=mask)
    value = tl.load(value_ptr + t * stride_vt + row * stride_vh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + slot * stride_ks + row * stride_kch + dims[None, :], key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vs + row * stride_vch + dims[None, :], value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Launch without checks: one program per (token, group of heads); negative slots are skipped."""
    tokens, num_heads, head_dim = key.shape
    if tokens == 0:
        return
    heads = min(next_power_of_2(num_heads), max(1, _WRITE_TILE // head_dim))
    launch(
        _write_kv_kernel, (tokens, cdiv(num_heads, heads)),
        key, value, k_cache, v_cache, slot_mapping, num_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEADS=heads, HEAD_DIM=head_dim, **pdl_options(key.device), num_warps=4,
    )


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_blocks_ptr, dst_blocks_ptr, block_elems,
    src_stride_layer, src_stride_kv, dst_stride_layer, dst_stride_kv,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    plane = tl.program_id(1)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    layer = (plane // 2).to(tl.int64)
    kv = (plane % 2).to(tl.int64)
    src_block = tl.load(src_blocks_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_blocks_ptr + pair).to(tl.int64)
    src = src_ptr + layer * src_stride_layer + kv * src_stride_kv + src_block * block_elems
    dst = dst_ptr + layer * dst_stride_layer + kv * dst_stride_kv + dst_block * block_elems
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int) -> None:
    """Launch without checks: block ``src[i]`` of ``src_cache`` to block ``dst[i]`` of ``dst_cache``
    in every layer, K and V. Each ``[num_slots, Hkv, D]`` plane must be contiguous, and the index
    tensors must be on the launching GPU."""
    num_layers = src_cache.shape[0]
    block_elems = block_size * src_cache.shape[3] * src_cache.shape[4]
    if src.numel() == 0:
        return
    grid = (src.numel(), num_layers * 2, cdiv(block_elems, _COPY_CHUNK))
    launch(
        _copy_blocks_kernel, grid, src_cache, dst_cache, src, dst, block_elems,
        src_cache.stride(0), src_cache.stride(1), dst_cache.stride(0), dst_cache.stride(1),
        CHUNK=min(_COPY_CHUNK, next_power_of_2(block_elems)), num_warps=4,
    )
