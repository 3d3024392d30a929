"""build_metadata on host data: decodes first, the prefill part's offsets and lengths, and the two
addressings (block tables padded to a stride of 16, or start offsets into one arena)."""

from __future__ import annotations

import numpy as np
import torch

from engines.kv.metadata import TABLE_WIDTH_QUANTUM, StepSequence, build_metadata

CPU = torch.device("cpu")


def test_a_mixed_step_splits_decodes_from_prompt_chunks():
    seqs = [StepSequence(9, 1), StepSequence(4, 1), StepSequence(0, 5), StepSequence(8, 3)]
    tables = np.arange(4 * 3, dtype=np.int32).reshape(4, 3)
    slots = np.arange(10)
    meta = build_metadata(seqs, slots, block_tables=tables, seq_starts=None, block_size=4, device=CPU)
    assert meta.num_decode_tokens == 2 and meta.slot_mapping.dtype == torch.int64
    assert meta.slot_mapping.tolist() == list(range(10))
    d = meta.decode
    assert d.seq_lens.tolist() == [10, 5] and d.max_seq_len == 10 and d.seq_lens.dtype == torch.int32
    assert d.addressing.block_tables.shape == (2, TABLE_WIDTH_QUANTUM) and d.addressing.seq_starts is None
    assert d.addressing.block_tables[:, :3].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert d.addressing.block_tables[:, 3:].eq(0).all() and d.addressing.block_size == 4
    p = meta.prefill
    assert p.query_start_loc.tolist() == [0, 5, 8] and p.query_start_loc.dtype == torch.int32
    assert p.seq_lens.tolist() == [5, 11] and p.max_query_len == 5 and p.max_seq_len == 11
    assert p.addressing.block_tables[:, :3].tolist() == [[6, 7, 8], [9, 10, 11]]
    kwargs = p.addressing.kernel_kwargs()
    assert kwargs["block_size"] == 4 and kwargs["seq_starts"] is None and kwargs["block_tables"] is p.addressing.block_tables


def test_a_one_token_prompt_is_a_prefill_and_decodes_must_lead():
    meta = build_metadata([StepSequence(0, 1)], np.array([3]), block_tables=None, seq_starts=np.array([7]),
                          block_size=1, device=CPU)
    assert meta.num_decode_tokens == 0 and meta.decode is None
    assert meta.prefill.query_start_loc.tolist() == [0, 1] and meta.prefill.addressing.seq_starts.tolist() == [7]
    # a decode after a prefill is not counted as one: the decode part is the leading run only
    meta = build_metadata([StepSequence(2, 3), StepSequence(5, 1)], np.arange(4), block_tables=None,
                          seq_starts=np.array([0, 10]), block_size=1, device=CPU)
    assert meta.num_decode_tokens == 0 and meta.prefill.seq_lens.tolist() == [5, 6]
    assert meta.prefill.max_query_len == 3 and meta.prefill.query_start_loc.tolist() == [0, 3, 4]


def test_a_decode_only_step_with_arena_offsets():
    meta = build_metadata([StepSequence(3, 1), StepSequence(20, 1)], np.array([3, 40]), block_tables=None,
                          seq_starts=np.array([0, 20], dtype=np.int64), block_size=1, device=CPU)
    assert meta.prefill is None and meta.num_decode_tokens == 2
    starts = meta.decode.addressing.seq_starts
    assert starts.tolist() == [0, 20] and starts.dtype == torch.int32 and meta.decode.addressing.block_tables is None
    assert meta.decode.max_seq_len == 21


def test_block_tables_already_a_multiple_of_16_wide_are_not_padded():
    tables = np.ones((2, 32), dtype=np.int32)
    meta = build_metadata([StepSequence(1, 1), StepSequence(0, 2)], np.arange(3), block_tables=tables, seq_starts=None,
                          block_size=2, device=CPU)
    assert meta.decode.addressing.block_tables.shape == (1, 32)
    assert meta.prefill.addressing.block_tables.shape == (1, 32)
    wide = build_metadata([StepSequence(1, 1)], np.arange(1), block_tables=np.ones((1, 17), dtype=np.int32),
                          seq_starts=None, block_size=2, device=CPU)
    assert wide.decode.addressing.block_tables.shape == (1, 32)


def test_every_tensor_is_put_on_the_device_given():
    meta_device = torch.device("meta")  # shapes and dtypes only: shows where each tensor was sent
    for tables, starts, bs in ((np.zeros((3, 2), dtype=np.int32), None, 4), (None, np.zeros(3, dtype=np.int32), 1)):
        meta = build_metadata([StepSequence(4, 1), StepSequence(0, 3), StepSequence(2, 2)], np.arange(6),
                              block_tables=tables, seq_starts=starts, block_size=bs, device=meta_device)
        tensors = [meta.slot_mapping, meta.decode.seq_lens, meta.prefill.seq_lens, meta.prefill.query_start_loc]
        for part in (meta.decode, meta.prefill):
            t = part.addressing.block_tables if tables is not None else part.addressing.seq_starts
            tensors.append(t)
            assert part.addressing.block_size == bs
        assert all(t.device.type == "meta" for t in tensors)
