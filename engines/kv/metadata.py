"""Per-step attention metadata: built by a KV manager, passed explicitly to the model.

A step's tokens are flattened into one batch with the decoding sequences (one new token
each) first and the prefilling ones (a chunk of their prompt) after them, so that the
model can run the decode kernel on the first part and the prefill kernel on the rest.
The paged and contiguous engines differ only in ``Addressing``: block tables or start
offsets into one arena. Everything here is device tensors plus host-side bounds, so the
model needs no device sync to launch its kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.transfer import to_device


@dataclass
class Addressing:
    """Where each sequence's tokens live in the cache: exactly one of the two tensors is set."""

    block_tables: torch.Tensor | None  # [B, max_blocks] int32 (paged)
    seq_starts: torch.Tensor | None  # [B] int32 (contiguous)
    block_size: int

    def kernel_kwargs(self) -> dict:
        return {"block_tables": self.block_tables, "seq_starts": self.seq_starts, "block_size": self.block_size}


@dataclass
class DecodeBatch:
    seq_lens: torch.Tensor  # [Bd] int32, context including the new token
    addressing: Addressing
    max_seq_len: int  # host-side upper bound of seq_lens


@dataclass
class PrefillBatch:
    query_start_loc: torch.Tensor  # [Bp + 1] int32, offsets into this part's query tokens
    seq_lens: torch.Tensor  # [Bp] int32, context including this chunk
    addressing: Addressing
    max_query_len: int
    max_seq_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: the cache slot each new token's K/V is written to (-1: skip)
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    decode: DecodeBatch | None
    prefill: PrefillBatch | None


@dataclass
class StepSequence:
    """One sequence's share of a step, as a KV manager describes it (host side)."""

    num_computed: int  # tokens whose K/V is already in the cache
    num_new: int  # tokens computed this step


# Block-table rows are padded to a multiple of this many entries, so that the row stride a
# kernel sees is always divisible by 16 (Triton specializes on that: a new stride class would
# mean a new compilation in the middle of a run).
TABLE_WIDTH_QUANTUM = 16


def _addressing(rows: slice, block_tables: np.ndarray | None, seq_starts: np.ndarray | None, block_size: int,
                device: torch.device) -> Addressing:
    if block_tables is not None:
        part = block_tables[rows]
        pad = -part.shape[1] % TABLE_WIDTH_QUANTUM
        part = np.pad(part, ((0, 0), (0, pad))) if pad else np.ascontiguousarray(part)
        return Addressing(to_device(part, device), None, block_size)
    part = np.ascontiguousarray(seq_starts[rows], dtype=np.int32)
    return Addressing(None, to_device(part, device), block_size)


def build_metadata(
    seqs: list[StepSequence],
    slot_mapping: np.ndarray,
    *,
    block_tables: np.ndarray | None,
    seq_starts: np.ndarray | None,
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Turn host-side step data into device metadata; decodes must come first in ``seqs``.

    The decode and prefill parts get tensors of their own rather than slices of shared ones:
    a slice's address would vary in alignment from step to step, and Triton compiles a kernel
    anew for each alignment class it sees.
    """
    num_new = np.fromiter((s.num_new for s in seqs), dtype=np.int32, count=len(seqs))
    seq_lens = num_new + np.fromiter((s.num_computed for s in seqs), dtype=np.int32, count=len(seqs))
    num_decodes = 0
    while num_decodes < len(seqs) and num_new[num_decodes] == 1 and seqs[num_decodes].num_computed > 0:
        num_decodes += 1

    def lens(rows: slice) -> torch.Tensor:
        return to_device(seq_lens[rows], device)

    decode = prefill = None
    if num_decodes:
        rows = slice(0, num_decodes)
        decode = DecodeBatch(lens(rows), _addressing(rows, block_tables, seq_starts, block_size, device),
                             int(seq_lens[rows].max()))
    if num_decodes < len(seqs):
        rows = slice(num_decodes, len(seqs))
        rest = num_new[rows]
        qsl = np.zeros(len(rest) + 1, dtype=np.int32)
        np.cumsum(rest, out=qsl[1:])
        prefill = PrefillBatch(
            query_start_loc=to_device(qsl, device),
            seq_lens=lens(rows),
            addressing=_addressing(rows, block_tables, seq_starts, block_size, device),
            max_query_len=int(rest.max()),
            max_seq_len=int(seq_lens[rows].max()),
        )
    return AttentionMetadata(
        slot_mapping=to_device(slot_mapping.astype(np.int64, copy=False), device),
        num_decode_tokens=num_decodes,
        decode=decode,
        prefill=prefill,
    )
