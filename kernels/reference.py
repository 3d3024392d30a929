"""Pure-torch attention and KV-cache kernels: the test oracles and the CPU path.

Layout shared by every kernel and both engines. One layer's cache is a tensor
``[num_slots, num_kv_heads, head_dim]``; a paged cache is the same memory seen as
``[num_blocks, block_size, num_kv_heads, head_dim]``. Only the addressing differs:

* paged: token ``t`` of sequence ``b`` lives in slot
  ``block_tables[b, t // block_size] * block_size + t % block_size``;
* contiguous: it lives in slot ``seq_starts[b] + t`` (one region of an arena per sequence).

``seq_lens[b]`` counts every token of sequence ``b`` whose K/V is in the cache after this
step's write, new tokens included; the ``q_len`` new query tokens of a sequence are its
last ``q_len`` positions and attend causally to everything up to their own position.
Math runs in float32 whatever the storage dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.checks import (
    check_attention_args, check_buffer, check_copy_args, check_norm_args, check_norm_outputs, check_out,
    check_write_args,
)


def context_slots(
    b: int,
    n: int,
    *,
    block_tables: torch.Tensor | None,
    seq_starts: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """Slot index of each of the first ``n`` tokens of sequence ``b``."""
    device = block_tables.device if block_tables is not None else seq_starts.device
    pos = torch.arange(n, device=device, dtype=torch.long)
    if block_tables is not None:
        blocks = block_tables[b, pos // block_size].long()
        return blocks * block_size + pos % block_size
    return seq_starts[b].long() + pos


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of the last ``m`` positions (q: [m, Hq, D]) over ``n`` keys (k, v: [n, Hkv, D]); with a
    ``window``, the query at position i sees only keys j with i - window < j <= i.

    The query heads of one KV head are stacked as rows of one matrix (GQA without repeating K/V).
    """
    m, num_heads, d = q.shape
    n, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qf = q.float().view(m, num_kv_heads, group, d).permute(1, 2, 0, 3).reshape(num_kv_heads, group * m, d)
    scores = torch.bmm(qf, k.float().permute(1, 2, 0)) * scale  # [Hkv, group * m, n]
    if m > 1 or window:
        q_pos = torch.arange(n - m, n, device=q.device).repeat(group).unsqueeze(1)
        k_pos = torch.arange(n, device=q.device).unsqueeze(0)
        hidden = k_pos > q_pos
        if window:
            hidden |= k_pos <= q_pos - window
        scores.masked_fill_(hidden, float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), v.float().transpose(0, 1))  # [Hkv, group * m, D]
    return out.view(num_kv_heads, group, m, d).permute(2, 0, 1, 3).reshape(m, num_heads, d).to(q.dtype)


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
    """Varlen causal attention: q [T, Hq, D], query tokens of sequence b are
    ``q[query_start_loc[b]:query_start_loc[b+1]]``; keys and values come from the cache. A sliding ``window``
    (Mistral's): the query at position i sees the keys i - window < j <= i, and no other is read.

    ``max_query_len`` / ``max_seq_len`` are host-side upper bounds that a GPU kernel sizes its
    grid with (the engine knows them without a device sync); the reference ignores them. ``out``: a [T, Hq, D]
    tensor to write the result into (and return), else a new one."""
    if validate:
        check_attention_args(q, k_cache, v_cache, seq_lens, block_tables, seq_starts, block_size, query_start_loc)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    else:
        check_out(out, q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, n in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        first = max(0, n - (hi - lo) - window + 1) if window else 0  # no query sees a key before this one
        slots = context_slots(b, n, block_tables=block_tables, seq_starts=seq_starts, block_size=block_size)[first:]
        out[lo:hi] = _attend(q[lo:hi], k_cache[slots], v_cache[slots], scale, window)
    return out


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
    """One query token per sequence (q: [B, Hq, D]) attending to its whole context, or with a sliding ``window``
    to its last ``window`` tokens (no other is read); ``out`` as ``prefill_attention``'s.

    All sequences at once, padded to the longest context and masked: the CPU engines decode
    hundreds of sequences per step, and a loop over them would dominate the step.
    """
    if validate:
        check_attention_args(q, k_cache, v_cache, seq_lens, block_tables, seq_starts, block_size)
    if out is not None:
        check_out(out, q)
        out.copy_(decode_attention(q, k_cache, v_cache, seq_lens, block_tables=block_tables, seq_starts=seq_starts,
                                   block_size=block_size, scale=scale, window=window, validate=False))
        return out
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, num_heads, d = q.shape
    if batch == 0:
        return torch.empty_like(q)
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    lens = seq_lens.long()
    pos = torch.arange(int(lens.max()), device=q.device)
    if block_tables is not None:
        width = block_tables.shape[1]
        blocks = block_tables.long().gather(1, (pos // block_size).clamp(max=width - 1).expand(batch, -1))
        slots = blocks * block_size + pos % block_size
    else:
        slots = seq_starts.long().unsqueeze(1) + pos
    valid = pos < lens.unsqueeze(1)  # [B, L]
    if window:
        valid &= pos >= lens.unsqueeze(1) - window
    slots = torch.where(valid, slots, 0)
    k = k_cache[slots].float()  # [B, L, Hkv, D]
    v = v_cache[slots].float()
    qf = q.float().view(batch, num_kv_heads, group, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(batch, num_heads, d).to(q.dtype)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Store new K/V rows (key, value: [T, Hkv, D]) at ``slot_mapping`` [T]; a negative slot is padding, skipped."""
    if validate:
        check_write_args(key, value, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = key[keep].to(k_cache.dtype)
    v_cache[slots] = value[keep].to(v_cache.dtype)


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
    """``rotary_embedding`` of q and k, then ``write_kv`` of the rotated k and of v [T, Hkv, D]: the step's keys
    and values go to the cache, and the rotated q is returned (a GPU backend does both in one launch), in ``q_out``
    when given (a buffer a CUDA graph reads)."""
    q, k = rotary_embedding(positions, q, k, cos_sin, q_norm_weight, k_norm_weight, eps)
    if q_out is not None:
        check_buffer("q_out", q_out, q.shape, q.dtype, q.device)
    write_kv(k, v, k_cache, v_cache, slot_mapping, validate=validate)
    return q if q_out is None else q_out.copy_(q)


def repeatable(attend: Callable[[torch.Tensor, torch.Tensor], object], k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """Run ``attend(k_cache, v_cache)`` (one layer's attention calls) and return what runs the same calls over
    another layer's cache planes: here ``attend`` itself (a GPU backend repeats its launches more cheaply)."""
    attend(k_cache, v_cache)
    return attend


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer (copy-on-write).

    ``kv_cache`` is the engine's whole cache ``[num_layers, 2, num_slots, Hkv, D]``.
    """
    check_copy_args(kv_cache, src, dst, block_size)
    offs = torch.arange(block_size, device=kv_cache.device)
    src_slots = (src.to(kv_cache.device).long().unsqueeze(1) * block_size + offs).flatten()
    dst_slots = (dst.to(kv_cache.device).long().unsqueeze(1) * block_size + offs).flatten()
    kv_cache[:, :, dst_slots] = kv_cache[:, :, src_slots]


def swap_blocks(
    src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int
) -> None:
    """Copy blocks ``src[i]`` of one cache to blocks ``dst[i]`` of another (GPU <-> pinned CPU swap).

    Both caches are ``[num_layers, 2, num_slots, Hkv, D]`` and may live on different devices.
    """
    check_copy_args(src_cache, src, src, block_size)
    check_copy_args(dst_cache, dst, dst, block_size)
    offs = torch.arange(block_size)
    src_slots = (src.cpu().long().unsqueeze(1) * block_size + offs).flatten()
    dst_slots = (dst.cpu().long().unsqueeze(1) * block_size + offs).flatten()
    moved = src_cache[:, :, src_slots.to(src_cache.device)]
    # A copy into CPU memory must land before the CPU scatter reads it (non_blocking would hand
    # back pinned memory still being written); a copy to the GPU is ordered on its stream.
    moved = moved.to(dst_cache.device, non_blocking=dst_cache.device.type != "cpu")
    dst_cache[:, :, dst_slots.to(dst_cache.device)] = moved


# -- the decoder's elementwise layers ------------------------------------------------------
# One call each, so a backend can fuse what eager torch runs as many small kernels (a decode
# step launches tens of them per layer). Numerics follow transformers: statistics in float32,
# results rounded to the input dtype before the weight multiplies.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (x: [..., H], weight: [H])."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RMSNorm of ``residual + x``, and ``residual + x`` (the new residual stream, in the input dtype). Either
    goes to a given buffer instead of a new tensor: ``residual_out`` may be ``residual`` itself (updated in place)."""
    check_norm_args(x, weight, residual)
    summed = residual + x
    normed = rms_norm(summed, weight, eps)
    check_norm_outputs(x, (normed.dtype, summed.dtype), out, residual_out)
    normed = normed if out is None else out.copy_(normed)
    return normed, (summed if residual_out is None else residual_out.copy_(summed))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up for gate_up = [gate | up] ([T, 2I] -> [T, I])."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# The linear layers: torch's (cuBLAS on a GPU); the Triton backend's differ only inside a CUDA graph's capture.


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer, ``x @ weight.T + bias`` (x: [..., K], weight: [N, K])."""
    return torch.nn.functional.linear(x, weight, bias)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU's gate and up projections with its activation: ``silu_and_mul(linear(x, weight, bias))``, the weight
    ``[gate | up]`` ([2I, K]; x: [..., K] -> [..., I])."""
    return silu_and_mul(linear(x, weight, bias))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (rotate-half) of q [T, Hq, D] and k [T, Hkv, D], after an
    optional per-head RMSNorm of each (Qwen3's q/k norm). ``cos_sin`` is [max_pos, D]: the
    cos table in the first D/2 columns, the sin table in the last, in the model dtype."""
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
