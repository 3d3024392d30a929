"""KV accounting: counters kept as memory changes agree with walks over the state, and external
fragmentation is measured against the demand actually waiting (docs/methodology.md, "KV memory")."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.detokenizer import SampleStream
from engines.kv.accounting import Allocation, KVLedger
from engines.kv.arena import Arena, HoleSizes
from engines.kv.block_manager import PagedKVManager
from engines.kv.contiguous_manager import ContiguousKVManager
from engines.request import Request, SamplingParams
from engines.sequence import Sequence


def seq(rid: str, prompt: int, max_tokens: int, n: int = 1, max_model_len: int = 1024) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, detokenize=False)
    request = Request(rid, list(range(1, prompt + 1)), params)
    stream = SampleStream(None, params, prompt, (), max_model_len)
    return Sequence(request, 0, stream, None, num_forks=n - 1)


# -- the arena's hole index --------------------------------------------------------------------------
def test_hole_sizes_count_the_slots_below_a_size_and_the_largest_hole():
    holes = HoleSizes(100)
    for size in (3, 10, 10, 40):
        holes.add(size)
    assert [holes.slots_below(r) for r in (1, 3, 4, 10, 11, 40, 41, 1000)] == [0, 0, 3, 3, 23, 23, 63, 63]
    assert holes.largest() == 40
    holes.add(40, -1)
    assert holes.largest() == 10 and holes.slots_below(1000) == 23
    holes.add(100)
    assert holes.largest() == 100
    for size in (3, 10, 10, 100):
        holes.add(size, -1)
    assert holes.largest() == 0 and holes.slots_below(101) == 0


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 300), policy=st.sampled_from(["first_fit", "best_fit"]),
       ops=st.lists(st.tuples(st.booleans(), st.integers(1, 80), st.integers(0, 50)), max_size=40))
def test_arena_counters_match_a_walk_after_every_operation(capacity, policy, ops):
    arena = Arena(capacity, policy)
    regions: list[tuple[int, int]] = []
    for alloc, size, pick in ops:
        if alloc or not regions:
            start = arena.allocate(size)
            if start is not None:
                regions.append((start, size))
        else:
            start, n = regions.pop(pick % len(regions))
            if pick % 3 == 0 and arena.extend(start, n, 1 + pick % 5):
                n += 1 + pick % 5
                regions.append((start, n))
                continue
            arena.free(start, n)
        arena.check()
    assert arena.num_free == capacity - sum(n for _, n in regions)


# -- external fragmentation ----------------------------------------------------------------------------
def test_orca_max_holes_are_all_usable_so_nothing_is_external():
    """Every region is max_model_len slots, so every hole is a multiple of it: free space, not fragmentation."""
    kv = ContiguousKVManager(4096, reservation="max", allocator="first_fit", max_model_len=1024)
    seqs = [seq(f"s{i}", 10, 20) for i in range(4)]
    for s in seqs:
        kv.admit(s)
        assert kv.allocate(s, 10)
    kv.free(seqs[0])
    kv.free(seqs[2])
    head = seq("head", 500, 300)
    stats = kv.kv_stats(head)
    assert (stats.free, stats.largest_free_extent, stats.external) == (2048, 1024, 0)
    assert kv.kv_stats(None).external == 0


def test_pow2_holes_smaller_than_the_head_demand_are_external():
    kv = ContiguousKVManager(200, reservation="pow2", allocator="first_fit", max_model_len=1024)
    a, b, c, d = seq("a", 10, 20), seq("b", 20, 40), seq("c", 10, 20), seq("d", 30, 34)  # 32, 64, 32, 64 slots
    for s in (a, b, c, d):
        kv.admit(s)
        assert kv.allocate(s, 1)
    assert kv.regions == {a.seq_id: (0, 32), b.seq_id: (32, 64), c.seq_id: (96, 32), d.seq_id: (128, 64)}
    kv.free(a)
    kv.free(c)
    # holes: [0, 32), [96, 128), [192, 200): 72 free slots
    assert kv.kv_stats(seq("h1", 20, 40)).external == 72  # needs 64: no hole serves it
    assert kv.kv_stats(seq("h2", 10, 20)).external == 8  # needs 32: only the 8-slot tail cannot serve it
    assert kv.kv_stats(seq("h3", 2, 2)).external == 0  # needs 4: every hole serves it
    assert kv.kv_stats(None).external == 0  # nothing waits: nothing is external


def test_reservation_sizes_of_each_policy():
    for policy, expected in (("max", 1024), ("pow2", 256), ("oracle", 100 + 30)):
        kv = ContiguousKVManager(4096, reservation=policy, allocator="first_fit", max_model_len=1024)
        s = seq("a", 100, 30)
        assert kv.reservation_for(s) == expected, policy
        kv.admit(s)
        assert kv.allocate(s, 100)
        assert kv.ledger.owned == expected and kv.kv_stats(None).allocated == expected
    kv = ContiguousKVManager(4096, reservation="pow2", allocator="first_fit", max_model_len=1024)
    assert kv.reservation_for(seq("b", 1000, 500, max_model_len=1024)) == 1024  # never past max_model_len
    assert kv.reservation_for(seq("c", 64, 64)) == 128 and kv.reservation_for(seq("d", 64, 65)) == 256


def test_paging_has_no_external_fragmentation():
    kv = PagedKVManager(8, 16, max_model_len=1024, enable_prefix_caching=False)
    a, b = seq("a", 40, 10), seq("b", 40, 10)
    for s in (a, b):
        kv.admit(s)
        assert kv.allocate(s, 40)
    kv.free(a)
    stats = kv.kv_stats(seq("head", 100, 100))
    assert stats.external == 0 and stats.free == 5 * 16


# -- the ledger ------------------------------------------------------------------------------------------
def test_ledger_logs_each_change_of_an_allocation_with_the_step_that_first_shows_it():
    ledger = KVLedger()
    a = seq("a", 10, 5)
    ledger.hold(a, 16)
    ledger.sample(1.0, None)
    a.num_computed = 10
    ledger.computed(10)
    ledger.hold(a, 16)  # no change: nothing logged
    ledger.hold(a, 32)
    ledger.sample(2.0, None)
    ledger.hold(a, 0)
    assert ledger.log.allocations == [Allocation(0, "a", 0, 16, 0), Allocation(1, "a", 0, 32, 10),
                                      Allocation(2, "a", 0, 0, 10)]
    assert (ledger.owned, ledger.stored) == (0, 0)
    log = ledger.drain()
    assert [(step, t) for step, t, _ in log.samples] == [(0, 1.0), (1, 2.0)]
    assert ledger.log.samples == [] and ledger.step == 2


def test_a_ledger_that_does_not_record_still_counts():
    ledger = KVLedger(record=False)
    a = seq("a", 10, 5)
    a.num_computed = 4
    ledger.hold(a, 16)
    ledger.sample(1.0, None)
    assert (ledger.owned, ledger.stored, ledger.step) == (16, 4, 1)
    assert ledger.log.samples == [] and ledger.log.allocations == []


def test_paged_token_states_count_a_shared_prefix_block_once():
    """Two sequences hold the same cached prompt block: allocated physically once, its tokens counted once."""
    kv = PagedKVManager(8, 4, max_model_len=64, enable_prefix_caching=True)
    a, b = seq("a", 9, 4), seq("b", 9, 4)
    kv.admit(a)
    assert kv.allocate(a, 9)
    a.num_computed = 9
    kv.ledger.computed(9)
    kv.commit(a)  # publishes its two full blocks
    kv.admit(b)  # finds them: 8 tokens computed already
    assert b.num_computed == 8
    assert kv.allocate(b, 1)
    stats = kv.kv_stats(None)
    assert stats.allocated == 4 * 4  # a: 3 blocks, b: 1 block of its own
    assert stats.stored == 9  # b's 8 cached tokens are a's
    kv.check_invariants([a, b])
    kv.free(a)
    kv.free(b)
    assert kv.kv_stats(None).cached == 8 and kv.kv_stats(None).allocated == 0
    kv.check_invariants([])


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_max_num_seqs_is_a_hard_cap_with_parallel_samples(tiny_model, preemption):
    from engines import create_engine
    from engines.config import PagedConfig

    engine = create_engine(tiny_model("tiny-qwen3"), PagedConfig(
        max_num_seqs=4, num_blocks=64, block_size=4, max_num_batched_tokens=64, preemption_mode=preemption,
        swap_space=0.001))
    for i in range(6):
        engine.add_request(Request(f"r{i}", [1 + i, 2, 3, 4, 5], SamplingParams(max_tokens=6, n=3, temperature=1.0,
                                                                                  seed=i, ignore_eos=True)))
    most = 0
    while engine.has_unfinished():
        engine.step()
        most = max(most, len(engine.scheduler.running))
        assert engine.scheduler.free_seats() >= 0
    assert most == 3  # one request of 3 samples at a time: a second would need 6 seats
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request(Request("big", [1, 2], SamplingParams(max_tokens=2, n=5)))


def test_the_server_feed_hands_out_what_came_after_a_cursor_and_says_what_it_dropped():
    from engines.base import KVStats
    from engines.kv.accounting import KVLog
    from engines.step_clock import StepTimes
    from harness.serve.kv_feed import KVFeed, log_from_reply

    feed = KVFeed(max_items=3)
    stats = KVStats(10, 1, 2, 8, 8)
    timed = StepTimes(1, 0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05)  # no device span: NaN, sent as null
    feed.add(KVLog([(i, float(i), stats) for i in range(2)], [Allocation(0, "x-0", 0, 4, 0)], times=[timed]))
    reply = feed.since(0, 0)
    assert [row[:2] for row in reply["samples"]] == [[0, 0.0], [1, 1.0]]
    assert reply["next"] == {"samples": 2, "allocations": 1, "times": 1}
    assert reply["missed"] == {"samples": 0, "allocations": 0, "times": 0}
    assert reply["times"] == [[1, 0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, None, 0.0]]  # gpu, then map
    back = log_from_reply(json.loads(json.dumps(reply)), {}, clock_offset=0.0).times
    assert len(back) == 1 and back[0].wall == 0.5 and math.isnan(back[0].gpu) and back[0].step == 1
    feed.add(KVLog([(i, float(i), stats) for i in range(2, 6)], breakdown=False))
    reply = feed.since(1, 1)  # samples 1 and 2 are gone: the feed keeps the newest 3
    assert [row[0] for row in reply["samples"]] == [3, 4, 5] and reply["missed"]["samples"] == 2
    assert reply["allocations"] == [] and reply["breakdown"] is False
    assert feed.since(99, 99)["samples"] == []
    log = log_from_reply(feed.since(0, 0), {"x-0": "x"}, clock_offset=0.5)
    assert [t for _, t, _ in log.samples] == [2.5, 3.5, 4.5] and log.samples[0][2] == stats
    assert log.allocations == [Allocation(0, "x", 0, 4, 0)] and log.breakdown is False


def test_a_later_drain_extends_a_log_and_a_breakdown_needs_both():
    from engines.base import KVStats
    from engines.kv.accounting import KVLog

    stats = KVStats(10, 1, 2, 8, 8)
    log = KVLog([(0, 0.0, stats)], [Allocation(0, "a", 0, 4, 0)])
    log.extend(KVLog([(1, 1.0, stats)], [Allocation(1, "a", 0, 0, 3)]))
    assert [s for s, _, _ in log.samples] == [0, 1] and [a.step for a in log.allocations] == [0, 1]
    assert log.breakdown is True
    log.extend(KVLog(breakdown=False))
    assert log.breakdown is False
    log.extend(KVLog())
    assert log.breakdown is False


def test_cache_ops_are_due_when_any_move_is_pending_and_carry_the_copy_unit():
    from engines.kv.manager import CacheOps

    assert not CacheOps()
    assert CacheOps(swap_out=[(1, 2)]) and CacheOps(swap_in=[(1, 2)]) and CacheOps(copies=[(1, 2)])
    kv = PagedKVManager(8, 4, max_model_len=64)
    assert kv.ops.copy_block_size == 4 and kv.take_ops().copy_block_size == 4 and kv.ops.copy_block_size == 4
    assert ContiguousKVManager(8, reservation="oracle", allocator="first_fit", max_model_len=8).ops.copy_block_size == 1
