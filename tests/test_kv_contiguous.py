"""ContiguousKVManager driven by hand: reservation sizes of each policy, a request's n regions
reserved together, forks copying the prompt, growth in place, addressing and counters
(docs/methodology.md, "Contiguous reservation policies")."""

from __future__ import annotations

import numpy as np
import pytest
from kv_sim import compute, seq

from engines.detokenizer import SampleStream
from engines.kv.contiguous_manager import ContiguousKVManager
from engines.sequence import Sequence


def manager(capacity: int, reservation: str = "oracle", max_model_len: int = 1024, allocator: str = "first_fit"):
    return ContiguousKVManager(capacity, reservation=reservation, allocator=allocator, max_model_len=max_model_len)


def child_of(parent: Sequence, index: int = 1) -> Sequence:
    p = parent.request.sampling_params
    child = Sequence(parent.request, index, SampleStream(None, p, parent.num_prompt, (), parent.stream.max_model_len), None)
    child.num_computed = parent.num_computed
    return child


@pytest.mark.parametrize("prompt, max_tokens, expected", [
    (64, 64, 128),  # exactly a power of two
    (64, 65, 256),
    (1, 1, 2),
    (3, 1, 4),
    (500, 600, 1024),  # the context bounds the length, and max_model_len the reservation
])
def test_pow2_reserves_the_longest_length_rounded_up_to_a_power_of_two(prompt, max_tokens, expected):
    assert manager(4096, "pow2").reservation_for(seq("a", prompt, max_tokens)) == expected


def test_pow2_never_reserves_past_max_model_len():
    assert manager(4096, "pow2", max_model_len=1000).reservation_for(seq("a", 600, 300, max_model_len=1000)) == 1000


def test_oracle_reserves_exactly_the_longest_length_and_max_the_context():
    assert manager(4096, "oracle").reservation_for(seq("a", 100, 30)) == 130
    assert manager(4096, "oracle", max_model_len=120).reservation_for(seq("a", 100, 30, max_model_len=120)) == 120
    assert manager(4096, "max", max_model_len=700).reservation_for(seq("a", 100, 30, max_model_len=700)) == 700


def test_unknown_reservation_policy_is_refused():
    with pytest.raises(ValueError, match="unknown reservation policy 'half'; choose one of max, pow2, oracle"):
        manager(100, "half")


def test_a_request_fits_if_all_its_regions_fit_in_the_arena():
    kv = manager(260, "oracle")
    assert kv.can_ever_fit(seq("a", 100, 30, n=2))  # 2 x 130 = 260
    assert not kv.can_ever_fit(seq("b", 100, 31, n=2))
    assert kv.can_ever_fit(seq("c", 200, 60)) and not kv.can_ever_fit(seq("d", 200, 61))


def test_admission_never_finds_anything_cached():
    kv = manager(100)
    a = seq("a", 10, 5)
    kv.admit(a)
    assert kv.allocate(a, 10)
    compute(kv, a, 10)
    b = seq("b", 10, 5)
    b.num_computed = 3
    kv.admit(b)
    assert b.num_computed == 0


def test_a_request_reserves_every_sample_region_at_admission_or_none():
    kv = manager(100, "oracle")
    a = seq("a", 10, 20, n=3)  # 3 x 30 slots
    kv.admit(a)
    assert kv.allocate(a, 10)
    assert kv.regions[a.seq_id] == (0, 30) and kv.spare[a.seq_id] == [(30, 30), (60, 30)]
    assert kv.ledger.held(a) == 90 and kv.kv_stats(None).allocated == 90
    b = seq("b", 2, 2, n=2)  # 2 x 4 slots, 10 free
    kv.admit(b)
    assert kv.allocate(b, 2) and kv.kv_stats(None).allocated == 98
    c = seq("c", 1, 1, n=2)  # 2 x 2 slots, 2 free: the first would fit, the pair does not
    kv.admit(c)
    assert not kv.allocate(c, 1)
    assert c.seq_id not in kv.regions and kv.arena.num_free == 2 and kv.ledger.held(c) == 0
    kv.check_invariants([a, b, c])


def test_a_fork_copies_the_prompt_into_a_reserved_region():
    kv = manager(100, "oracle")
    x = seq("x", 4, 1)
    kv.admit(x)
    assert kv.allocate(x, 4)  # regions do not start at 0
    p = seq("p", 5, 3, n=3)  # 3 x 8 slots
    kv.admit(p)
    assert kv.allocate(p, 5)
    compute(kv, p, 5)
    kv.take_ops()
    c1, c2 = child_of(p, 1), child_of(p, 2)
    kv.fork(p, c1)
    kv.fork(p, c2)
    assert kv.regions[p.seq_id] == (5, 8)
    starts = {kv.regions[c.seq_id][0] for c in (c1, c2)}
    assert starts == {13, 21}
    ops = kv.take_ops()
    assert ops.copy_block_size == 1
    assert sorted(ops.copies) == sorted([(5 + i, s + i) for s in (13, 21) for i in range(5)])
    assert [kv.ledger.held(s) for s in (p, c1, c2)] == [8, 8, 8] and kv.kv_stats(None).stored == 5 + 5 + 5 + 0
    kv.check_invariants([x, p, c1, c2])
    for s in (c1, p, c2):
        kv.free(s)
    kv.free(x)
    assert kv.arena.num_free == 100 and kv.ledger.owned == 0
    kv.check_invariants([])


def test_a_region_too_small_grows_in_place_or_the_allocation_fails():
    kv = manager(40, "oracle")
    a, b = seq("a", 4, 4), seq("b", 4, 4)  # 8 slots each
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, 4)
        compute(kv, s, 4)
    assert kv.allocate(a, 4) and kv.regions[a.seq_id] == (0, 8)  # exactly the reservation
    assert not kv.allocate(a, 5)  # one more: b's region is in the way
    assert kv.regions[a.seq_id] == (0, 8) and kv.ledger.held(a) == 8
    assert kv.allocate(b, 12) and kv.regions[b.seq_id] == (8, 16)  # grows into the free space after it
    assert kv.ledger.held(b) == 16 and kv.kv_stats(None).allocated == 24
    kv.check_invariants([a, b])
    assert not kv.allocate(b, 40)


def test_slots_and_starts_address_each_region():
    kv = manager(100, "oracle")
    a, b = seq("a", 4, 6), seq("b", 3, 3)
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, s.num_tokens)
    assert kv.regions[b.seq_id] == (10, 6)
    assert kv.slot_mapping(b, 1, 4).tolist() == [11, 12, 13]
    assert kv.decode_slots([a, b], np.array([4, 3])).tolist() == [4, 13]
    assert kv.decode_slots([a, b], np.array([[4, 3], [5, 4]])).tolist() == [[4, 13], [5, 14]]
    tables, starts = kv.addressing([b, a])
    assert tables is None and starts.tolist() == [10, 0] and starts.dtype == np.int32
    assert kv.max_blocks_per_seq(1024) == 0 and kv.block_size == 1


def test_kv_stats_reports_the_arena_and_external_fragmentation_for_the_head():
    kv = manager(100, "oracle")
    a, b, c = seq("a", 10, 10), seq("b", 10, 20), seq("c", 10, 10)  # 20, 30, 20 slots
    for s in (a, b, c):
        kv.admit(s)
        assert kv.allocate(s, 10)
    compute(kv, b, 10)
    kv.free(a)  # holes: [0, 20) and [70, 100)
    stats = kv.kv_stats(seq("head", 20, 5))  # needs 25: the 20-slot hole cannot serve it
    assert (stats.capacity, stats.allocated, stats.free, stats.largest_free_extent) == (100, 50, 50, 30)
    assert stats.external == 20 and stats.stored == 10 and stats.cached == 0
    assert kv.kv_stats(seq("head", 10, 10)).external == 0  # needs 20: every hole serves it
    assert kv.kv_stats(None).external == 0


def test_freeing_twice_or_a_sequence_never_admitted_is_harmless():
    kv = manager(50)
    a = seq("a", 5, 5)
    kv.admit(a)
    assert kv.allocate(a, 5)
    kv.free(a)
    kv.free(a)
    kv.free(seq("never", 3, 3))
    assert kv.arena.num_free == 50 and kv.ledger.owned == 0


@pytest.mark.parametrize("corrupt", ["overlap", "gap", "outlived", "ledger", "arena_counter"])
def test_check_invariants_catches_each_broken_invariant(corrupt):
    kv = manager(60)
    a, b = seq("a", 5, 5), seq("b", 5, 5, n=2)
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, 5)
    kv.check_invariants([a, b])
    seqs = [a, b]
    if corrupt == "overlap":
        kv.regions[a.seq_id] = (0, 11)
    elif corrupt == "gap":
        kv.spare[b.seq_id] = []
    elif corrupt == "outlived":
        seqs = [b]
    elif corrupt == "ledger":
        kv.ledger.stored += 1
    elif corrupt == "arena_counter":
        kv.arena.num_free += 1
    with pytest.raises(AssertionError):
        kv.check_invariants(seqs)


def test_the_allocator_policy_reaches_the_arena():
    placed = {}
    for policy in ("first_fit", "best_fit"):
        kv = manager(100, "oracle", allocator=policy)
        a, b, c = seq("a", 25, 10), seq("b", 10, 10), seq("c", 10, 5)  # 35, 20, 15 slots
        for s in (a, b, c):
            kv.admit(s)
            assert kv.allocate(s, 1)
        kv.free(a)  # holes: [0, 35) and [70, 100)
        d, e = seq("d", 20, 10), seq("e", 25, 10)  # 30 slots, then 35
        kv.admit(d)
        assert kv.allocate(d, 1)
        placed[policy] = kv.regions[d.seq_id][0]
        kv.admit(e)
        assert kv.allocate(e, 1) == (policy == "best_fit")  # first fit split the only hole e fitted
    assert placed == {"first_fit": 0, "best_fit": 70}


def test_freeing_a_request_before_its_samples_fork_frees_every_region():
    kv = manager(60, "oracle")
    a = seq("a", 5, 5, n=3)
    kv.admit(a)
    assert kv.allocate(a, 5)
    assert kv.arena.num_free == 30
    kv.free(a)  # aborted while its prompt ran
    assert kv.arena.num_free == 60 and kv.arena.lengths == [60] and a.seq_id not in kv.spare


def test_slots_are_int64_and_starts_int32():
    kv = manager(100, "oracle")
    a = seq("a", 4, 6)
    kv.admit(a)
    assert kv.allocate(a, 4)
    assert kv.slot_mapping(a, 0, 4).dtype == np.int64 and kv.decode_slots([a], np.array([4])).dtype == np.int64
    assert kv.addressing([a])[1].dtype == np.int32
