"""A forward's inputs as one int32 tensor and a small host-side description, so rank 0 sends them in one broadcast.

Rank 0 packs the token ids, positions and attention metadata it built (device tensors: a decode's token may be one it
sampled and never read back); a worker receives the tensor and unpacks the same inputs. Inside a CUDA graph the pack,
the broadcast and the unpack are captured too, so a replay moves the static input buffers without the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.kv.metadata import Addressing, AttentionMetadata, DecodeBatch, PrefillBatch

_DTYPES = {"int32": torch.int32, "int64": torch.int64}
WIRE_DTYPE = torch.int32


@dataclass(frozen=True)
class InputSpec:
    """Shapes and dtypes of the packed tensors in order (None: absent), and the metadata's host-side numbers."""

    shapes: tuple[tuple[int, ...] | None, ...]
    dtypes: tuple[str | None, ...]
    num_decode_tokens: int
    block_size: int
    decode_max_seq_len: int
    prefill_max_query_len: int
    prefill_max_seq_len: int

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes if s is not None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensors(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> list[torch.Tensor | None]:
    d, p = meta.decode, meta.prefill
    out: list[torch.Tensor | None] = [ids, positions, meta.slot_mapping]
    out += [None, None, None] if d is None else [d.seq_lens, d.addressing.block_tables, d.addressing.seq_starts]
    if p is None:
        out += [None] * 4
    else:
        out += [p.query_start_loc, p.seq_lens, p.addressing.block_tables, p.addressing.seq_starts]
    return out


def pack(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> tuple[InputSpec, torch.Tensor]:
    """The description and one flat int32 tensor of a forward's inputs (every value fits: token ids, positions, slots,
    block numbers and lengths; int32 halves what a replay broadcasts, its whole block-table buffer included)."""
    tensors = _tensors(ids, positions, meta)
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.reshape(-1).to(WIRE_DTYPE) for t in present])
    addressing = (meta.decode or meta.prefill).addressing
    spec = InputSpec(
        shapes=tuple(None if t is None else tuple(t.shape) for t in tensors),
        dtypes=tuple(None if t is None else str(t.dtype).removeprefix("torch.") for t in tensors),
        num_decode_tokens=meta.num_decode_tokens,
        block_size=addressing.block_size,
        decode_max_seq_len=meta.decode.max_seq_len if meta.decode else 0,
        prefill_max_query_len=meta.prefill.max_query_len if meta.prefill else 0,
        prefill_max_seq_len=meta.prefill.max_seq_len if meta.prefill else 0,
    )
    return spec, flat


def unpack(spec: InputSpec, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(ids, positions, metadata) from ``pack``'s output."""
    parts: list[torch.Tensor | None] = []
    offset = 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        if shape is None:
            parts.append(None)
            continue
        n = _numel(shape)
        # a copy of its own: a slice's address varies in alignment, and Triton compiles anew per alignment class
        parts.append(flat[offset : offset + n].view(shape).to(_DTYPES[dtype], copy=True))
        offset += n
    ids, positions, slots, d_lens, d_tables, d_starts, p_qsl, p_lens, p_tables, p_starts = parts
    decode = prefill = None
    if d_lens is not None:
        decode = DecodeBatch(d_lens, Addressing(d_tables, d_starts, spec.block_size), spec.decode_max_seq_len)
    if p_lens is not None:
        prefill = PrefillBatch(p_qsl, p_lens, Addressing(p_tables, p_starts, spec.block_size),
                               spec.prefill_max_query_len, spec.prefill_max_seq_len)
    return ids, positions, AttentionMetadata(slots, spec.num_decode_tokens, decode, prefill)
