"""PagedKVManager driven by hand: the prefix cache's hash chain (across chunks, decodes, preemption
by recompute and swapping), eviction order, copy-on-write, swapping, addressing and its counters."""

from __future__ import annotations

import numpy as np
import pytest
from kv_sim import compute, seq

from engines.detokenizer import SampleStream
from engines.kv.block_manager import BlockTableArray, PagedKVManager
from engines.sequence import Sequence

A = list(range(100, 114))  # 14 tokens: blocks of 4 -> [100..103] [104..107] [108..111] [112 113]


def admitted(kv: PagedKVManager, s: Sequence) -> int:
    """Admit ``s`` and return how many of its tokens the prefix cache already held."""
    kv.admit(s)
    return s.num_computed


def decode(kv: PagedKVManager, s: Sequence, token: int) -> None:
    """One decode step: the last token's K/V is computed, a new token is sampled."""
    s.token_ids.append(token)
    assert kv.allocate(s, 1)
    compute(kv, s, 1)


def table_ids(kv: PagedKVManager, s: Sequence) -> list[int]:
    return [b.block_id for b in kv.tables[s.seq_id]]


# -- the hash chain -------------------------------------------------------------------------------
def test_a_prompt_published_chunk_by_chunk_hits_whole_and_only_at_its_own_position():
    kv = PagedKVManager(16, 4, max_model_len=64)
    a = seq("a", A, 8)
    assert admitted(kv, a) == 0
    for n in (5, 5, 4):  # chunked prefill: each commit publishes the blocks that became full
        assert kv.allocate(a, n)
        compute(kv, a, n)
    assert admitted(kv, seq("same", A + [1], 8)) == 12  # every full block, each chained to its parent
    assert admitted(kv, seq("shifted", A[4:] + [1, 2], 8)) == 0  # a's 2nd block at position 0: not a first block
    assert admitted(kv, seq("shifted2", A[8:12] + [1, 2], 8)) == 0
    assert admitted(kv, seq("diverges", A[:4] + [0] * 4 + A[8:] + [1], 8)) == 4  # equal 3rd block, other parent
    assert admitted(kv, seq("short", A[:4], 8)) == 0  # one token must be left to compute, for the logits
    assert admitted(kv, seq("short+1", A[:5], 8)) == 4


def test_blocks_filled_by_decoding_are_published_on_the_chain():
    kv = PagedKVManager(16, 4, max_model_len=64)
    a = seq("a", A[:6], 8)
    kv.admit(a)
    assert kv.allocate(a, 6)
    compute(kv, a, 6)
    for token in (7, 8, 9):  # computes positions 6, 7 (the 2nd block is full), 8
        decode(kv, a, token)
    assert a.token_ids == A[:6] + [7, 8, 9] and a.num_computed == 9
    assert admitted(kv, seq("b", a.token_ids[:8] + [0], 8)) == 8
    assert admitted(kv, seq("c", a.token_ids[4:8] + [0], 8)) == 0


def test_a_sequence_readmitted_after_recompute_finds_its_blocks_and_extends_the_chain():
    kv = PagedKVManager(8, 4, max_model_len=64)
    a = seq("a", A[:10], 8)
    kv.admit(a)
    assert kv.allocate(a, 10)
    compute(kv, a, 10)  # blocks 0 and 1 published
    decode(kv, a, 50)
    decode(kv, a, 51)  # 12 computed: block 2 (108, 109, 50, 51) published too
    kv.free(a)  # preempted by recompute: its blocks stay findable while free
    a.num_computed = 0
    assert admitted(kv, a) == 8  # 3 full blocks cached, but the last token must be computed: 2 blocks
    assert a.num_cached_prompt == 8 and kv.num_prefix_hits == 8
    assert kv.allocate(a, 4)
    compute(kv, a, 4)  # recomputes block 2 into a fresh block and publishes it after block 1
    a.token_ids.append(52)
    assert kv.allocate(a, 1)
    compute(kv, a, 1)
    kv.check_invariants([a])
    prefix = A[:10] + [50, 51]
    assert admitted(kv, seq("b", prefix + [0], 8)) == 12
    assert admitted(kv, seq("c", prefix[8:] + [0], 8)) == 0  # block 2 is not a first block
    assert admitted(kv, seq("d", prefix[4:] + [0], 8)) == 0


def test_a_sequence_swapped_back_in_republishes_its_blocks_on_the_chain():
    kv = PagedKVManager(6, 4, max_model_len=64, num_host_blocks=8)
    a = seq("a", A[:10], 8)
    kv.admit(a)
    assert kv.allocate(a, 10)
    compute(kv, a, 10)  # table of 3 blocks, 2 published
    old = table_ids(kv, a)
    kv.take_ops()
    assert kv.swap_out(a)
    out = kv.take_ops().swap_out
    assert [d for d, _ in out] == old and kv.num_swapped_out == 1
    x = seq("x", list(range(500, 524)), 1)  # takes all 6 blocks: a's old ones leave the prefix cache
    kv.admit(x)
    assert kv.allocate(x, 24)
    kv.free(x)
    assert kv.swap_in(a)
    back = kv.take_ops().swap_in
    assert [h for h, _ in back] == [h for _, h in out]  # each block's copy comes back in order ...
    assert [d for _, d in back] == table_ids(kv, a)  # ... into the sequence's new blocks
    decode(kv, a, 60)  # the next step publishes its full blocks again, chained from the first
    kv.check_invariants([a])
    assert admitted(kv, seq("b", A[:8] + [0], 8)) == 8
    assert admitted(kv, seq("c", A[4:8] + [0], 8)) == 0  # a's 2nd block is no first block
    assert admitted(kv, seq("d", [0, 0, 0, 0] + A[4:8] + [0], 8)) == 0


def test_swapped_out_blocks_stay_in_the_prefix_cache_until_reused():
    kv = PagedKVManager(8, 4, max_model_len=64, num_host_blocks=4)
    a = seq("a", A[:9], 8)
    kv.admit(a)
    assert kv.allocate(a, 9)
    compute(kv, a, 9)
    assert kv.swap_out(a)
    assert kv.kv_stats(None).cached == 8 and kv.kv_stats(None).allocated == 0
    assert admitted(kv, seq("b", A[:9], 8)) == 8


# -- eviction ---------------------------------------------------------------------------------------
def test_freed_blocks_are_reused_least_recently_freed_first_and_a_tail_before_its_prefix():
    kv = PagedKVManager(4, 4, max_model_len=64)
    a = seq("a", A[:13], 4)
    kv.admit(a)
    assert kv.allocate(a, 13)
    compute(kv, a, 13)  # 4 blocks; the first 3 full and published
    kv.free(a)
    assert kv.kv_stats(None).cached == 12 and kv.kv_stats(None).free == 16
    x = seq("x", list(range(500, 505)), 4)
    kv.admit(x)
    assert kv.allocate(x, 5)  # two blocks: a's unpublished tail, then its 3rd block
    assert kv.kv_stats(None).cached == 8
    assert admitted(kv, seq("b", A[:13], 4)) == 8  # its first two blocks survived


def test_a_block_freed_earlier_is_evicted_before_one_freed_later():
    kv = PagedKVManager(2, 4, max_model_len=64)
    a, b = seq("a", [1, 2, 3, 4, 5], 2), seq("b", [6, 7, 8, 9, 10], 2)
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, 4)
        compute(kv, s, 4)
    kv.free(a)
    kv.free(b)
    x = seq("x", [0, 0], 2)
    kv.admit(x)
    assert kv.allocate(x, 2)  # takes a's block: freed first
    assert admitted(kv, seq("a2", [1, 2, 3, 4, 5], 2)) == 0
    assert admitted(kv, seq("b2", [6, 7, 8, 9, 10], 2)) == 4


def test_a_cached_block_found_again_leaves_the_free_queue_and_the_cached_count():
    kv = PagedKVManager(4, 4, max_model_len=64)
    a = seq("a", A[:9], 4)
    kv.admit(a)
    assert kv.allocate(a, 9)
    compute(kv, a, 9)
    kv.free(a)
    assert kv.kv_stats(None).cached == 8
    b = seq("b", A[:9], 4)
    kv.admit(b)  # two cached blocks found
    stats = kv.kv_stats(None)
    assert (stats.cached, stats.allocated, stats.free) == (0, 8, 8)
    kv.check_invariants([b])
    assert kv.allocate(b, 1)
    c = seq("c", A[:9], 4)  # shares b's two blocks while b holds them
    kv.admit(c)
    assert c.num_computed == 8 and kv.kv_stats(None).allocated == 12
    kv.check_invariants([b, c])
    kv.free(b)
    kv.free(c)
    assert kv.kv_stats(None).cached == 8
    kv.check_invariants([])


# -- counters --------------------------------------------------------------------------------------
def test_prefix_cache_counts_prompt_tokens_looked_up_and_found_at_most_the_prompt():
    kv = PagedKVManager(8, 4, max_model_len=64)
    a = seq("a", A[:6], 8)
    kv.admit(a)
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (6, 0)
    assert kv.allocate(a, 6)
    compute(kv, a, 6)
    for token in (7, 8, 9):
        decode(kv, a, token)  # 2 full blocks: 6 prompt tokens and 2 generated ones
    kv.free(a)
    a.num_computed = 0
    kv.admit(a)  # re-admitted after recompute: 8 tokens found, of which 6 are prompt
    assert a.num_computed == 8 and a.num_cached_prompt == 6
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (12, 6)
    stats = kv.kv_stats(None)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (12, 6)
    kv.admit(seq("b", A[:6] + [7, 8, 9, 1], 8))  # another request with that prefix: 8 of its 10 prompt tokens
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (22, 14)


def test_without_prefix_caching_nothing_is_looked_up_published_or_counted():
    kv = PagedKVManager(8, 4, max_model_len=64, enable_prefix_caching=False)
    a = seq("a", A[:9], 8)
    kv.admit(a)
    assert kv.allocate(a, 9)
    compute(kv, a, 9)
    kv.free(a)
    assert admitted(kv, seq("b", A[:9], 8)) == 0
    assert (kv.num_prefix_queries, kv.num_prefix_hits, kv.kv_stats(None).cached) == (0, 0, 0)


def test_kv_stats_counts_blocks_and_their_token_states():
    kv = PagedKVManager(10, 4, max_model_len=64, num_host_blocks=4)
    a = seq("a", A[:9], 8)
    kv.admit(a)
    assert kv.allocate(a, 9)
    compute(kv, a, 9)
    b = seq("b", A[:9] + [7], 8)
    kv.admit(b)  # shares a's two full blocks
    assert kv.allocate(b, 2)
    stats = kv.kv_stats(seq("head", 30, 30))
    # a: 3 blocks, b: 2 shared + 1 own; tokens: a's 9 (8 shared with b) + b's 2 not yet computed
    assert (stats.capacity, stats.allocated, stats.free, stats.largest_free_extent) == (40, 16, 24, 24)
    assert stats.stored == 9 and stats.external == 0 and stats.cached == 0
    compute(kv, b, 2)
    assert kv.kv_stats(None).stored == 11
    kv.check_invariants([a, b])
    assert kv.swap_out(b)
    assert kv.kv_stats(None).num_swapped_out == 1


# -- allocation, copy-on-write, swapping ---------------------------------------------------------
def test_allocation_takes_exactly_the_free_blocks_it_needs_or_nothing():
    kv = PagedKVManager(4, 4, max_model_len=64)
    a = seq("a", 17, 4)
    kv.admit(a)
    assert not kv.allocate(a, 17)  # 5 blocks: one short
    assert kv.tables[a.seq_id] == [] and kv.pool.num_free == 4 and kv.ledger.owned == 0
    assert kv.allocate(a, 16)  # exactly the 4 free blocks
    assert kv.pool.num_free == 0 and kv.ledger.owned == 16
    assert kv.allocate(a, 0)
    kv.check_invariants([a])


def test_forked_samples_share_blocks_until_one_writes_into_a_shared_one():
    kv = PagedKVManager(8, 4, max_model_len=64)
    p = seq("p", 6, 4, n=2)
    kv.admit(p)
    assert kv.allocate(p, 6)
    compute(kv, p, 6)
    child = Sequence(p.request, 1, SampleStream(None, p.request.sampling_params, 6, (), 64), None)
    child.num_computed = p.num_computed
    kv.fork(p, child)
    shared = list(kv.tables[p.seq_id])
    assert table_ids(kv, child) == table_ids(kv, p) and [b.ref_count for b in shared] == [2, 2]
    assert kv.ledger.held(child) == 8 and kv.kv_stats(None).allocated == 8
    assert kv.kv_stats(None).stored == 6  # the shared part-filled block's 2 empty slots count once, not per sample
    kv.take_ops()
    p.token_ids.append(40)
    child.token_ids.append(41)
    assert kv.allocate(p, 1)  # writes position 6, in the shared 2nd block: copied first
    assert kv.kv_stats(None).stored == 8  # block 0 still shared (4), and a copy each of the 2 tokens after it
    ops = kv.take_ops()
    assert ops.copies == [(shared[1].block_id, kv.tables[p.seq_id][1].block_id)] and ops.copy_block_size == 4
    assert kv.tables[child.seq_id][1] is shared[1] and shared[1].ref_count == 1
    assert kv.tables[p.seq_id][0] is kv.tables[child.seq_id][0] and kv.tables[p.seq_id][0].ref_count == 2
    assert kv.allocate(child, 1) and not kv.take_ops().copies  # the child's block is its own now
    kv.check_invariants([p, child])
    compute(kv, p, 1)
    compute(kv, child, 1)
    kv.free(p)
    kv.free(child)
    kv.check_invariants([])
    assert kv.pool.num_free == 8


def test_copy_on_write_needs_a_free_block():
    kv = PagedKVManager(2, 4, max_model_len=64)
    p = seq("p", 6, 4, n=2)
    kv.admit(p)
    assert kv.allocate(p, 6)
    compute(kv, p, 6)
    child = Sequence(p.request, 1, SampleStream(None, p.request.sampling_params, 6, (), 64), None)
    child.num_computed = 6
    kv.fork(p, child)
    p.token_ids.append(40)
    assert not kv.allocate(p, 1)  # no block to copy the shared one into
    assert kv.tables[p.seq_id] == kv.tables[child.seq_id]
    kv.free(child)
    assert kv.allocate(p, 1) and not kv.take_ops().copies  # sole holder again: no copy


def test_a_decode_into_room_left_in_an_unshared_block_takes_nothing():
    kv = PagedKVManager(4, 4, max_model_len=64)
    a = seq("a", 5, 4)
    kv.admit(a)
    assert kv.allocate(a, 5)
    compute(kv, a, 5)
    a.token_ids.append(9)
    free = kv.pool.num_free
    assert kv.allocate(a, 1) and kv.pool.num_free == free and kv.ledger.owned == 8


def test_swap_out_needs_a_host_block_for_every_block():
    kv = PagedKVManager(8, 4, max_model_len=64, num_host_blocks=3)
    a, b = seq("a", 9, 4), seq("b", 13, 4)
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, s.num_tokens)
        compute(kv, s, s.num_tokens)
    assert not kv.swap_out(b)  # 4 blocks, 3 host blocks
    assert kv.tables[b.seq_id] and kv.num_swapped_out == 0 and not kv.take_ops().swap_out
    assert kv.swap_out(a)  # 3 blocks: exactly enough
    assert a.seq_id not in kv.tables and len(kv.host_tables[a.seq_id]) == 3 and kv.host_free == []
    kv.check_invariants([a, b])
    kv.free(a)  # dropped while swapped out: its host blocks come back
    assert sorted(kv.host_free) == [0, 1, 2]


def test_swap_in_needs_room_for_its_blocks_and_the_next_token():
    kv = PagedKVManager(4, 4, max_model_len=64, num_host_blocks=4)
    a = seq("a", 8, 4)
    kv.admit(a)
    assert kv.allocate(a, 8)
    compute(kv, a, 8)
    assert kv.swap_out(a)
    x = seq("x", list(range(500, 505)), 4)
    kv.admit(x)
    assert kv.allocate(x, 5)  # 2 free blocks left: a needs 2 + 1 for its next token
    assert not kv.swap_in(a) and a.seq_id in kv.host_tables
    kv.free(x)
    kv.admit(x)
    assert kv.allocate(x, 4)  # 3 free
    assert kv.swap_in(a) and len(kv.tables[a.seq_id]) == 2
    assert kv.ledger.held(a) == 8 and sorted(kv.host_free) == [0, 1, 2, 3]
    a.token_ids.append(1)
    assert kv.allocate(a, 1)
    kv.check_invariants([a, x])


# -- addressing ------------------------------------------------------------------------------------
def test_slots_and_block_tables_address_each_sequence_blocks():
    kv = PagedKVManager(8, 4, max_model_len=64)
    x, a, b = seq("x", 4, 1), seq("a", 6, 4), seq("b", 3, 4)
    for s in (x, a, b):
        kv.admit(s)
        assert kv.allocate(s, s.num_tokens)
    assert table_ids(kv, a) == [1, 2] and table_ids(kv, b) == [3]
    assert kv.slot_mapping(a, 2, 6).tolist() == [6, 7, 8, 9]
    assert kv.slot_mapping(b, 0, 3).tolist() == [12, 13, 14]
    assert kv.decode_slots([a, b], np.array([5, 2])).tolist() == [9, 14]
    assert kv.decode_slots([a, b], np.array([[4, 1], [5, 2]])).tolist() == [[8, 13], [9, 14]]
    tables, starts = kv.addressing([a, b])
    assert starts is None and tables.shape == (2, 2)
    assert tables[0].tolist() == [1, 2] and tables[1, 0] == 3
    assert kv.addressing([b])[0].tolist() == [[3]]
    assert kv.max_blocks_per_seq(64) == 16 and kv.max_blocks_per_seq(65) == 17


def test_block_table_rows_grow_past_the_initial_array_and_are_reused():
    kv = PagedKVManager(100, 1, max_model_len=8)
    seqs = [seq(f"s{i}", 1, 1, max_model_len=8) for i in range(70)]
    for s in seqs:
        kv.admit(s)
        assert kv.allocate(s, 1)
    kv.check_invariants(seqs)
    assert [kv.slot_mapping(s, 0, 1)[0] for s in seqs] == list(range(70))
    kv.free(seqs[0])
    kv.free(seqs[0])  # a second free is harmless
    late = seq("late", 2, 1, max_model_len=8)
    kv.admit(late)
    assert kv.allocate(late, 2)
    assert kv.table_array.row_of[late.seq_id] == 0  # the freed row
    kv.check_invariants(seqs[1:] + [late])


def test_block_table_array_doubles_and_keeps_its_rows():
    t = BlockTableArray(3, rows=2)
    t.assign(10, [1, 2, 3])
    t.assign(11, [4])
    t.assign(12, [5, 6])  # no free row: the array doubles
    assert t.array.shape == (4, 3)
    assert t.rows([10, 11, 12], 3).tolist()[0] == [1, 2, 3] and t.rows([12], 2).tolist() == [[5, 6]]
    assert t.rows([11], 1).tolist() == [[4]]
    t.assign(13, [7])
    t.set(13, 1, 8)
    assert t.rows([13], 2).tolist() == [[7, 8]]
    assert sorted(t.row_of.values()) == [0, 1, 2, 3]
    for seq_id in range(14, 19):  # full again: doubles to 8 rows, each row its own
        t.assign(seq_id, [seq_id])
    assert t.array.shape == (16, 3) and sorted(t.row_of.values()) == list(range(9))
    assert t.rows(list(range(14, 19)), 1).ravel().tolist() == list(range(14, 19))


def test_addresses_are_integers_of_the_widths_the_kernels_take():
    kv = PagedKVManager(8, 4, max_model_len=64)
    a = seq("a", 6, 4)
    kv.admit(a)
    assert kv.allocate(a, 6)
    assert kv.slot_mapping(a, 0, 6).dtype == np.int64 and kv.decode_slots([a], np.array([5])).dtype == np.int64
    assert kv.addressing([a])[0].dtype == np.int32


def test_two_sequences_publishing_the_same_block_leave_one_in_the_index():
    kv = PagedKVManager(8, 4, max_model_len=64)
    a, b = seq("a", A[:6], 4), seq("b", A[:6], 4)
    for s in (a, b):  # both admitted before either published: no hit, each computes its own copy
        assert admitted(kv, s) == 0
        assert kv.allocate(s, 6)
    compute(kv, a, 6)
    compute(kv, b, 6)
    first_a, first_b = kv.tables[a.seq_id][0], kv.tables[b.seq_id][0]
    assert first_a.hash == first_b.hash and kv.pool.cached[first_a.hash] is first_a
    kv.free(b)
    assert kv.kv_stats(None).cached == 0  # b's copy is free but no lookup can find it
    kv.check_invariants([a])
    kv.free(a)
    assert kv.kv_stats(None).cached == 4
    kv.check_invariants([])
    x = seq("x", list(range(500, 529)), 4)  # takes every block: b's copy, then a's (leaving the index)
    kv.admit(x)
    assert kv.allocate(x, 29) and kv.pool.cached == {}
    kv.check_invariants([x])


def test_a_hit_is_verified_against_the_tokens_and_a_block_released_twice_is_an_error():
    kv = PagedKVManager(4, 4, max_model_len=64)
    a = seq("a", A[:5], 4)
    kv.admit(a)
    assert kv.allocate(a, 5)
    compute(kv, a, 5)
    block = kv.tables[a.seq_id][0]
    assert kv.pool.lookup(block.hash, tuple(A[:4])) is block
    assert kv.pool.lookup(block.hash, (1, 2, 3, 4)) is None  # same hash, other tokens: no hit
    kv.free(a)
    with pytest.raises(AssertionError, match="released more often than acquired"):
        kv.pool.release(block)


def test_without_host_blocks_nothing_can_be_swapped():
    kv = PagedKVManager(4, 4, max_model_len=64)
    a = seq("a", 3, 4)
    kv.admit(a)
    assert kv.allocate(a, 3)
    assert not kv.swap_out(a) and kv.host_free == []


def test_several_swaps_in_one_step_are_all_handed_to_the_runner():
    kv = PagedKVManager(8, 4, max_model_len=64, num_host_blocks=8)
    a, b = seq("a", 7, 4), seq("b", list(range(200, 205)), 4)
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, s.num_tokens)
        compute(kv, s, s.num_tokens)
    kv.take_ops()
    assert kv.swap_out(a) and kv.swap_out(b)
    ops = kv.take_ops()
    assert len(ops.swap_out) == 4 and kv.num_swapped_out == 2 and kv.kv_stats(None).num_swapped_out == 2
    assert kv.swap_in(a) and kv.swap_in(b)
    assert len(kv.take_ops().swap_in) == 4
    kv.check_invariants([a, b])


def test_swap_in_of_a_sequence_ending_inside_a_block_needs_no_extra_block():
    kv = PagedKVManager(4, 4, max_model_len=64, num_host_blocks=4)
    a = seq("a", 7, 4)
    kv.admit(a)
    assert kv.allocate(a, 7)
    compute(kv, a, 7)  # 2 blocks, position 7 still free in the 2nd
    assert kv.swap_out(a)
    x = seq("x", list(range(500, 505)), 4)
    kv.admit(x)
    assert kv.allocate(x, 5)  # exactly 2 blocks left
    assert kv.swap_in(a)
    a.token_ids.append(1)
    assert kv.allocate(a, 1)


def test_a_sequence_fits_if_its_longest_end_fits_in_all_blocks():
    kv = PagedKVManager(4, 4, max_model_len=64)
    assert kv.can_ever_fit(seq("a", 10, 6))  # 16 tokens: 4 blocks
    assert not kv.can_ever_fit(seq("b", 10, 7))
    assert kv.can_ever_fit(seq("c", 60, 7, max_model_len=16))  # the context bounds it


# -- the invariant check can fail -----------------------------------------------------------------
def _state():
    kv = PagedKVManager(6, 4, max_model_len=64, num_host_blocks=2)
    a = seq("a", A[:9], 4)
    kv.admit(a)
    assert kv.allocate(a, 9)
    compute(kv, a, 9)
    b = seq("b", A[:9], 4)
    kv.admit(b)
    kv.check_invariants([a, b])
    return kv, a, b


@pytest.mark.parametrize("corrupt", [
    "ref_count", "free_and_held", "lost_block", "stale_index", "table_array", "host_block", "cached_counter",
    "ledger", "outlived",
])
def test_check_invariants_catches_each_broken_invariant(corrupt):
    kv, a, b = _state()
    seqs = [a, b]
    block = kv.tables[a.seq_id][2]
    if corrupt == "ref_count":
        block.ref_count += 1
    elif corrupt == "free_and_held":
        kv.pool.free_queue[block.block_id] = None
    elif corrupt == "lost_block":
        del kv.pool.free_queue[next(iter(kv.pool.free_queue))]
    elif corrupt == "stale_index":
        kv.tables[a.seq_id][0].hash = 12345
    elif corrupt == "table_array":
        kv.table_array.set(a.seq_id, 1, 5)
    elif corrupt == "host_block":
        kv.host_free.append(0)
    elif corrupt == "cached_counter":
        kv.pool.num_cached_free += 1
    elif corrupt == "ledger":
        kv.ledger.stored += 1
    elif corrupt == "outlived":
        seqs = [a]
    with pytest.raises(AssertionError):
        kv.check_invariants(seqs)
