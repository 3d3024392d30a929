"""Host-side argument checks shared by the reference and Triton kernels.

A bad argument must be a clear Python error before launch, never a device fault. The
checks read shapes and dtypes only, except the bound check of block tables and seq_starts,
which reads one max() from the device: callers in a hot loop that build those tables
themselves (the engines) pass ``validate=False``. The checks every eager attention call runs
(``check_query``, ``check_cache_pair``, ``check_triton_cache``, ``check_addressing_mode``,
``check_out``) raise directly: a message closure per check, as ``_require`` takes, cost more
than the check.
"""

from __future__ import annotations

from typing import Callable

import torch


class KernelArgumentError(ValueError):
    """An argument a kernel cannot run with; the message names it."""


_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_TYPES = (torch.int32, torch.int64)


def _require(cond: bool, message: str | Callable[[], str]) -> None:
    """``message`` may be a function that formats it: checks on a hot path (the layer ops run
    tens of times per step) then format nothing unless they fail."""
    if not cond:
        raise KernelArgumentError(message if isinstance(message, str) else message())


def check_block_size(block_size: int) -> None:
    if not (isinstance(block_size, int) and 1 <= block_size <= 256 and block_size & (block_size - 1) == 0):
        raise KernelArgumentError(f"block_size must be a power of two in [1, 256], got {block_size!r}")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 3:
        raise KernelArgumentError(
            f"k_cache must be [num_slots, num_kv_heads, head_dim], got shape {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise KernelArgumentError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.dtype != v_cache.dtype:
        raise KernelArgumentError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.dtype not in _FLOAT_TYPES:
        raise KernelArgumentError(f"cache dtype must be fp16, bf16 or fp32, got {k_cache.dtype}")
    if k_cache.device != v_cache.device:
        raise KernelArgumentError("k_cache and v_cache are on different devices")


def check_addressing(
    batch: int,
    num_slots: int,
    block_tables: torch.Tensor | None,
    seq_starts: torch.Tensor | None,
    block_size: int,
    seq_lens: torch.Tensor,
) -> None:
    """Exactly one addressing mode, with every address inside the cache."""
    _require(
        (block_tables is None) != (seq_starts is None),
        "pass exactly one of block_tables (paged) or seq_starts (contiguous)",
    )
    _require(seq_lens.dim() == 1 and seq_lens.shape[0] == batch, lambda: f"seq_lens must be [{batch}], got {tuple(seq_lens.shape)}")
    _require(seq_lens.dtype in _INDEX_TYPES, lambda: f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
    max_len = int(seq_lens.max()) if batch else 0
    if block_tables is not None:
        check_block_size(block_size)
        _require(block_tables.dim() == 2 and block_tables.shape[0] == batch,
                 lambda: f"block_tables must be [{batch}, max_blocks], got {tuple(block_tables.shape)}")
        _require(block_tables.dtype in _INDEX_TYPES, lambda: f"block_tables must be int32 or int64, got {block_tables.dtype}")
        _require(num_slots % block_size == 0, lambda: f"cache of {num_slots} slots is not a whole number of {block_size}-slot blocks")
        needed = -(-max_len // block_size)
        _require(block_tables.shape[1] >= needed,
                 lambda: f"block_tables has {block_tables.shape[1]} columns but a sequence of {max_len} tokens needs {needed}")
        if batch and block_tables.numel():
            num_blocks = num_slots // block_size
            # Only the entries a sequence actually uses must be valid; padding entries may hold anything.
            used = torch.arange(block_tables.shape[1], device=block_tables.device) < (
                (seq_lens.to(block_tables.device).long() + block_size - 1) // block_size
            ).unsqueeze(1)
            entries = block_tables[used]
            if entries.numel():
                lo, hi = int(entries.min()), int(entries.max())
                _require(lo >= 0 and hi < num_blocks,
                         lambda: f"block table entry {hi if hi >= num_blocks else lo} is outside the cache's {num_blocks} blocks")
    else:
        _require(seq_starts.dim() == 1 and seq_starts.shape[0] == batch, lambda: f"seq_starts must be [{batch}], got {tuple(seq_starts.shape)}")
        _require(seq_starts.dtype in _INDEX_TYPES, lambda: f"seq_starts must be int32 or int64, got {seq_starts.dtype}")
        if batch:
            ends = seq_starts.long() + seq_lens.to(seq_starts.device).long()
            _require(int(seq_starts.min()) >= 0 and int(ends.max()) <= num_slots,
                     lambda: f"a contiguous region runs past the cache's {num_slots} slots")


def check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    """An attention output to write into: q's shape, dtype and device, unit stride in the head dim."""
    if not (out.shape == q.shape and out.dtype == q.dtype and out.device == q.device):
        raise KernelArgumentError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} like q, got "
                                  f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(-1) != 1:
        raise KernelArgumentError(f"out must have unit stride in its last dim, got strides {out.stride()}")


def check_query(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Shapes, dtypes and devices of the query against the cache (no device sync)."""
    check_cache_pair(k_cache, v_cache)
    if q.dim() != 3:
        raise KernelArgumentError(f"q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise KernelArgumentError(f"q is {q.dtype} but the cache is {k_cache.dtype}")
    if q.device != k_cache.device:
        raise KernelArgumentError(f"q is on {q.device} but the cache is on {k_cache.device}")
    _, heads, head_dim = q.shape
    _, kv_heads, cache_head_dim = k_cache.shape
    if head_dim != cache_head_dim:
        raise KernelArgumentError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if heads % kv_heads:
        raise KernelArgumentError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")


def check_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor | None,
    seq_starts: torch.Tensor | None,
    block_size: int,
    query_start_loc: torch.Tensor | None = None,
) -> None:
    check_query(q, k_cache, v_cache)
    if query_start_loc is None:
        batch = q.shape[0]
    else:
        _require(query_start_loc.dim() == 1 and query_start_loc.shape[0] >= 1, "query_start_loc must be [batch + 1]")
        batch = query_start_loc.shape[0] - 1
        if batch:
            q_lens = (query_start_loc[1:] - query_start_loc[:-1]).to(seq_lens.device)
            _require(int(query_start_loc[-1]) == q.shape[0],
                     lambda: f"query_start_loc ends at {int(query_start_loc[-1])} but q has {q.shape[0]} tokens")
            _require(bool((q_lens >= 0).all()) and bool((q_lens <= seq_lens).all()),
                     "each sequence needs 0 <= query length <= seq_len")
    check_addressing(batch, k_cache.shape[0], block_tables, seq_starts, block_size, seq_lens)


def check_write_args(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    check_write_shapes(key, value, k_cache, v_cache, slot_mapping)
    if slot_mapping.numel():
        _require(int(slot_mapping.max()) < k_cache.shape[0],
                 lambda: f"slot {int(slot_mapping.max())} is outside the cache's {k_cache.shape[0]} slots")


def check_write_shapes(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Shapes and dtypes of a K/V write (no device sync)."""
    check_cache_pair(k_cache, v_cache)
    _require(key.shape == value.shape, lambda: f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    _require(key.dim() == 3 and key.shape[1:] == k_cache.shape[1:],
             lambda: f"key must be [tokens, {k_cache.shape[1]}, {k_cache.shape[2]}], got {tuple(key.shape)}")
    _require(slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0],
             lambda: f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    _require(slot_mapping.dtype in _INDEX_TYPES, lambda: f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")


def check_copy_args(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int) -> None:
    check_block_size(block_size)
    _require(kv_cache.dim() == 5 and kv_cache.shape[1] == 2,
             lambda: f"kv_cache must be [num_layers, 2, num_slots, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    _require(src.shape == dst.shape and src.dim() == 1, "src and dst must be 1-D block lists of equal length")
    num_blocks = kv_cache.shape[2] // block_size
    for name, blocks in (("src", src), ("dst", dst)):
        if blocks.numel():
            _require(int(blocks.min()) >= 0 and int(blocks.max()) < num_blocks,
                     f"{name} block outside the cache's {num_blocks} blocks")


def _check_float(name: str, x: torch.Tensor) -> None:
    _require(x.dtype in _FLOAT_TYPES, lambda: f"{name} must be fp16, bf16 or fp32, got {x.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    first, *rest = tensors.values()
    _require(all(t.device == first.device for t in rest),
             lambda: f"tensors on different devices: { {name: str(t.device) for name, t in tensors.items()} }")


def check_norm_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """RMSNorm over the last dimension: a ``[H]`` weight, a residual of x's shape, float dtypes."""
    _require(x.dim() >= 1, "x must have a last dimension to normalize")
    _require(weight.shape == x.shape[-1:], lambda: f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    _check_float("x", x)
    _check_float("weight", weight)
    if residual is None:
        _check_same_device(x=x, weight=weight)
        return
    _require(residual.shape == x.shape, lambda: f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    _check_float("residual", residual)
    _check_same_device(x=x, weight=weight, residual=residual)


def check_silu_and_mul_args(gate_up: torch.Tensor) -> None:
    _require(gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0,
             lambda: f"gate_up must be [..., 2 * intermediate], got shape {tuple(gate_up.shape)}")
    _check_float("gate_up", gate_up)


def check_rotary_args(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
) -> None:
    """q [T, Hq, D] and k [T, Hkv, D] of one dtype, positions [T], a [max_pos, D] table, and
    both q/k norm weights ([D], one dtype) or neither."""
    _require(q.dim() == 3 and k.dim() == 3,
             lambda: f"q and k must be [tokens, heads, head_dim], got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, _, head_dim = q.shape
    _require(k.shape[0] == tokens and k.shape[2] == head_dim,
             lambda: f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens and head_dim")
    _require(head_dim % 2 == 0, lambda: f"rotate-half needs an even head_dim, got {head_dim}")
    _require(positions.shape == (tokens,), lambda: f"positions must be [{tokens}], got {tuple(positions.shape)}")
    _require(positions.dtype in _INDEX_TYPES, lambda: f"positions must be int32 or int64, got {positions.dtype}")
    _require(cos_sin.dim() == 2 and cos_sin.shape[1] == head_dim,
             lambda: f"cos_sin must be [max_positions, {head_dim}], got {tuple(cos_sin.shape)}")
    _require(q.dtype == k.dtype, lambda: f"q is {q.dtype} but k is {k.dtype}")
    _check_float("q", q)
    _check_float("cos_sin", cos_sin)
    _require((q_norm_weight is None) == (k_norm_weight is None), "pass both q_norm_weight and k_norm_weight, or neither")
    if q_norm_weight is None:
        _check_same_device(positions=positions, q=q, k=k, cos_sin=cos_sin)
        return
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        _require(w.shape == (head_dim,), lambda: f"{name} must be [{head_dim}], got {tuple(w.shape)}")
        _check_float(name, w)
    _require(q_norm_weight.dtype == k_norm_weight.dtype,
             lambda: f"q_norm_weight is {q_norm_weight.dtype} but k_norm_weight is {k_norm_weight.dtype}")
    _check_same_device(positions=positions, q=q, k=k, cos_sin=cos_sin,
                       q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)


# Checks the Triton kernels add: what their tiling and pointer arithmetic assume. All read
# shapes and strides only, except check_blocks_disjoint, which reads the block lists.


def check_triton_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """A power-of-two head_dim (a tile dimension) and unit-stride rows."""
    head_dim = k_cache.shape[-1]
    if not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0):
        raise KernelArgumentError(f"the Triton kernels need a power-of-two head_dim in [16, 256], got {head_dim}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise KernelArgumentError(f"k_cache and v_cache rows must be contiguous (stride(-1) == 1), got strides "
                                  f"{k_cache.stride()} and {v_cache.stride()}")


def check_addressing_mode(block_tables: torch.Tensor | None, seq_starts: torch.Tensor | None, block_size: int) -> None:
    """Exactly one addressing mode, and a valid block size for paging."""
    if (block_tables is None) == (seq_starts is None):
        raise KernelArgumentError("pass exactly one of block_tables (paged) or seq_starts (contiguous)")
    if block_tables is not None:
        check_block_size(block_size)


def check_cache_planes(kv_cache: torch.Tensor) -> None:
    """Each ``[num_slots, Hkv, D]`` plane of a whole cache is contiguous, so a block is one run of memory."""
    _, _, _, heads, head_dim = kv_cache.shape
    _require(kv_cache.stride()[2:] == (heads * head_dim, head_dim, 1),
             lambda: f"each [num_slots, Hkv, D] plane of the cache must be contiguous, got strides {kv_cache.stride()}")


def check_swap_pair(src_cache: torch.Tensor, dst_cache: torch.Tensor) -> None:
    _require(src_cache.dtype == dst_cache.dtype, lambda: f"src_cache is {src_cache.dtype} but dst_cache is {dst_cache.dtype}")
    _require(src_cache.shape[:2] == dst_cache.shape[:2] and src_cache.shape[3:] == dst_cache.shape[3:],
             lambda: f"caches {tuple(src_cache.shape)} and {tuple(dst_cache.shape)} differ beyond their slot count")


def check_blocks_disjoint(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Blocks copied in parallel: a destination that is also a source would race."""
    if src.numel():
        _require(not bool(torch.isin(dst.to(src.device), src).any()), "a dst block is also a src block")


def check_buffer(name: str, given: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
    """A caller's buffer for a result (``out=`` and the like): contiguous, of the result's shape, dtype and device."""
    _require(given.shape == shape and given.dtype == dtype and given.device == device and given.is_contiguous(),
             lambda: f"{name} must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got "
                     f"{tuple(given.shape)} {given.dtype} on {given.device} (strides {given.stride()})")


def check_norm_outputs(x: torch.Tensor, dtypes: tuple[torch.dtype, torch.dtype], out: torch.Tensor | None,
                       residual_out: torch.Tensor | None) -> None:
    """Buffers for ``add_rms_norm``'s two results, of x's shape and ``dtypes`` (normed, summed)."""
    for name, given, dtype in (("out", out, dtypes[0]), ("residual_out", residual_out, dtypes[1])):
        if given is not None:
            check_buffer(name, given, x.shape, dtype, x.device)


def check_norm_width(width: int, limit: int) -> None:
    """The Triton RMSNorm holds a whole row in registers."""
    _require(width <= limit, lambda: f"the Triton RMSNorm handles rows of at most {limit} elements, got {width}")
