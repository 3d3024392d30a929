"""The shared scheduler (engines/scheduler.py) over real KV managers, without a model: the token
budget, FCFS admission, the hard cap on running sequences, preemption of the newest sequence by
recompute or swap, multi-step look-ahead and abort, step by step and on random workloads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_sim import Sim, seq

from engines.kv.block_manager import PagedKVManager
from engines.kv.contiguous_manager import ContiguousKVManager
from engines.scheduler import ScheduledBatch, Scheduler
from engines.sequence import SeqStatus


def num_tokens(batch: ScheduledBatch) -> int:
    """The tokens a batch computes: one per decode, the chunk of each prefill."""
    return len(batch.decodes) + sum(n for _, n in batch.prefills)


def paged(num_blocks: int = 64, block_size: int = 4, host: int = 0, caching: bool = False) -> PagedKVManager:
    return PagedKVManager(num_blocks, block_size, max_model_len=1024, num_host_blocks=host,
                          enable_prefix_caching=caching)


def prefills(batch) -> list[tuple[str, int]]:
    return [(s.request.request_id, n) for s, n in batch.prefills]


def decodes(batch) -> list[str]:
    return [s.request.request_id for s in batch.decodes]


# -- the token budget and admission -----------------------------------------------------------------
def test_the_token_budget_bounds_every_step_and_prompts_are_chunked_to_fit():
    sim = Sim(paged(), max_num_batched_tokens=16)
    sim.add(seq("a", 40, 3))
    sim.add(seq("b", 10, 3))
    steps = [sim.step() for _ in range(4)]
    assert [prefills(b) for b in steps] == [[("a", 16)], [("a", 16)], [("a", 8), ("b", 8)], [("b", 2)]]
    assert [decodes(b) for b in steps] == [[], [], [], ["a"]]
    assert [num_tokens(b) for b in steps] == [16, 16, 16, 3]
    sim.run()
    assert all(num_tokens(b) <= 16 for b in sim.batches)


def test_without_chunking_a_prompt_runs_whole_and_the_first_that_does_not_fit_stops_admission():
    sim = Sim(paged(), max_num_batched_tokens=16, enable_chunked_prefill=False)
    for rid, n in (("a", 10), ("b", 10), ("c", 3)):
        sim.add(seq(rid, n, 2))
    first = sim.step()
    assert prefills(first) == [("a", 10)]  # b needs 10 of the 6 left, and c (which fits) waits behind it (FCFS)
    assert [s.request.request_id for s in sim.scheduler.waiting] == ["b", "c"]
    second = sim.step()
    assert decodes(second) == ["a"] and prefills(second) == [("b", 10), ("c", 3)]
    assert num_tokens(second) == 14


def test_decodes_come_first_oldest_first_then_prompt_chunks_then_new_prompts():
    sim = Sim(paged(), max_num_batched_tokens=12)
    for rid, n in (("a", 2), ("b", 2), ("c", 20), ("d", 4)):
        sim.add(seq(rid, n, 5))
    assert prefills(sim.step()) == [("a", 2), ("b", 2), ("c", 8)]
    batch = sim.step()
    assert decodes(batch) == ["a", "b"] and prefills(batch) == [("c", 10)]
    batch = sim.step()
    assert decodes(batch) == ["a", "b"] and prefills(batch) == [("c", 2), ("d", 4)]
    assert decodes(sim.step()) == ["a", "b", "c", "d"]


def test_running_sequences_never_exceed_max_num_seqs_counting_the_samples_to_come():
    sim = Sim(paged(), max_num_seqs=3)
    a, b, c = sim.add(seq("a", 4, 3, n=2)), sim.add(seq("b", 4, 3, n=2)), sim.add(seq("c", 4, 3))
    assert prefills(sim.step()) == [("a", 4)]  # a keeps a seat for its 2nd sample: 1 left, b needs 2
    assert sim.scheduler.free_seats() == 1
    sim.step()  # a's prompt done: its second sample joins
    assert len(sim.scheduler.running) == 2 and sim.scheduler.free_seats() == 1
    assert b.status is SeqStatus.WAITING and c.status is SeqStatus.WAITING  # FCFS: c waits behind b
    while b.status is SeqStatus.WAITING:
        sim.step()
        assert len(sim.scheduler.running) + sim.scheduler.num_pending_forks <= 3
    assert a.status is SeqStatus.FINISHED
    sim.run()
    assert sorted(s.key for s in sim.finished) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]


def test_nothing_is_admitted_past_the_budget_or_when_the_budget_is_spent():
    sim = Sim(paged(), max_num_batched_tokens=4)
    sim.add(seq("a", 4, 2))
    sim.add(seq("b", 1, 2))
    assert prefills(sim.step()) == [("a", 4)]  # the budget is spent: b waits
    assert prefills(sim.step()) == [("b", 1)]


# -- preemption --------------------------------------------------------------------------------------
def two_running(kv, **kw) -> tuple[Sim, object, object]:
    sim = Sim(kv, **kw)
    a, b = sim.add(seq("a", 7, 10)), sim.add(seq("b", 7, 10))
    sim.step()  # both prompts: 2 blocks each, 1 token of room left in each
    return sim, a, b


def test_out_of_memory_preempts_the_newest_running_sequence_by_recompute():
    sim, a, b = two_running(paged(4))
    assert decodes(sim.step()) == ["a", "b"]  # positions 7: the last slot of each 2nd block
    batch = sim.step()  # a needs a 3rd block: none free, so b (the newest) gives its memory back
    assert decodes(batch) == ["a"] and batch.preempted == [b] and not batch.prefills
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and sim.scheduler.waiting[0] is b
    assert sim.kv.ledger.held(b) == 0 and sim.scheduler.num_preemptions == 1
    sim.kv.check_invariants(sim.scheduler.live)
    sim.run()
    assert len(b.token_ids) == 17 and len(a.token_ids) == 17


def test_the_newest_sequence_preempts_itself_rather_than_an_older_scheduled_one():
    kv = paged(5)
    sim = Sim(kv)
    a, b = sim.add(seq("a", 8, 10)), sim.add(seq("b", 7, 10))
    sim.step()  # a: 2 full blocks; b: 2 blocks, room for 1; 1 free
    sim.step()  # a takes the free block, b uses its room
    batch = sim.step()  # a has room; b needs a block, none free, a already scheduled: b preempts itself
    assert decodes(batch) == ["a"] and batch.preempted == [b]
    assert b.status is SeqStatus.WAITING and sim.scheduler.running == [a]


def test_preemption_by_swap_parks_the_victim_and_brings_it_back_before_new_prompts():
    kv = paged(4, host=8)
    sim, a, b = two_running(kv, preemption_mode="swap")
    sim.step()
    c = sim.add(seq("c", 2, 2))
    batch = sim.step()
    assert batch.preempted == [b] and b.status is SeqStatus.SWAPPED and list(sim.scheduler.swapped) == [b]
    assert b.num_computed == 8 and kv.num_swapped_out == 1 and c.status is SeqStatus.WAITING
    while True:
        batch = sim.step()
        if b.status is not SeqStatus.SWAPPED:
            break
        assert c.status is SeqStatus.WAITING  # nothing new is admitted while a sequence is swapped out
    assert b in batch.decodes and b.status is SeqStatus.RUNNING
    assert batch.decodes.index(b) == len(batch.decodes) - 1  # after the running decodes, before new prompts
    sim.run()
    assert {s.request.request_id for s in sim.finished} == {"a", "b", "c"}
    assert len(b.token_ids) == 17


def test_a_prompt_swapped_out_part_way_comes_back_for_its_next_chunk_not_as_a_decode():
    kv = paged(6, host=16)
    sim = Sim(kv, max_num_batched_tokens=8, preemption_mode="swap")
    a, b = sim.add(seq("a", 7, 12)), sim.add(seq("b", 20, 4))
    sim.step()
    sim.step()  # b: 8 of its 20 prompt tokens computed
    assert sim.step().preempted == [b] and b.status is SeqStatus.SWAPPED and b.num_computed == 8
    returned = False
    for _ in range(40):
        if not sim.scheduler.has_unfinished():
            break
        batch = sim.step()  # Sim.step checks that every decode has exactly its last token to compute
        returned |= any(s is b for s, _ in batch.prefills) and b.num_computed > 8
    assert returned and not sim.scheduler.has_unfinished()
    assert b.token_ids[:20] == list(range(1, 21)) and len(b.token_ids) == 24  # its whole prompt, then 4 tokens


def test_swap_falls_back_to_recompute_without_host_memory():
    kv = paged(4, host=1)
    sim, a, b = two_running(kv, preemption_mode="swap")
    sim.step()
    batch = sim.step()
    assert batch.preempted == [b] and b.status is SeqStatus.WAITING and b.num_computed == 0
    assert not sim.scheduler.swapped


# -- multi-step decode ---------------------------------------------------------------------------------
def test_a_decode_only_batch_runs_several_steps_each_within_its_remaining_length():
    sim = Sim(paged(), num_scheduler_steps=4)
    a, b = sim.add(seq("a", 3, 10)), sim.add(seq("b", 3, 3))
    sim.step()  # prompts (one token each sampled)
    batch = sim.step()
    assert decodes(batch) == ["a", "b"] and batch.decode_steps == [4, 2]
    assert b.status is SeqStatus.FINISHED and len(b.token_ids) == 6
    batch = sim.step()
    assert batch.decode_steps == [4]
    batch = sim.step()
    assert batch.decode_steps == [1] and a.status is SeqStatus.FINISHED and len(a.token_ids) == 13


def test_multi_step_needs_a_decode_only_batch_without_penalties():
    sim = Sim(paged(), num_scheduler_steps=4)
    sim.add(seq("a", 3, 10))
    sim.step()
    sim.add(seq("b", 3, 10))
    batch = sim.step()  # b's prompt rides along: one step
    assert prefills(batch) == [("b", 3)] and batch.decode_steps == [1]
    sim2 = Sim(paged(), num_scheduler_steps=4)
    sim2.add(seq("p", 3, 10, presence_penalty=0.5))
    sim2.add(seq("q", 3, 10))
    sim2.step()
    assert sim2.step().decode_steps == [1, 1]  # penalties read every step's tokens
    for name, kw in (("frequency", {"frequency_penalty": 0.5}), ("repetition", {"repetition_penalty": 1.2})):
        sim3 = Sim(paged(), num_scheduler_steps=4)
        sim3.add(seq(name, 3, 10, **kw))
        sim3.step()
        assert sim3.step().decode_steps == [1], name


def test_multi_step_stops_at_the_context_and_where_memory_would_run_out():
    sim = Sim(PagedKVManager(64, 4, max_model_len=8, enable_prefix_caching=False), num_scheduler_steps=4)
    a = sim.add(seq("a", 5, 10, max_model_len=8))
    sim.step()
    batch = sim.step()
    assert batch.decode_steps == [2] and len(a.token_ids) == 8 and a.status is SeqStatus.FINISHED
    sim = Sim(paged(2), num_scheduler_steps=4)
    b = sim.add(seq("b", 7, 10))
    sim.step()  # 2 blocks: nothing free for a look-ahead past position 7
    batch = sim.step()
    assert batch.decode_steps == [1] and not batch.preempted


# -- abort and bookkeeping ---------------------------------------------------------------------------
def test_abort_drops_every_sample_of_a_request_wherever_it_is_and_frees_its_memory():
    kv = paged(8, host=8)
    sim = Sim(kv, preemption_mode="swap", max_num_seqs=4)
    a, b, c = sim.add(seq("a", 7, 10, n=2)), sim.add(seq("b", 7, 10)), sim.add(seq("c", 4, 4))
    sim.step()
    sim.step()
    running = {s.request.request_id for s in sim.scheduler.running}
    assert "a" in running
    sim.scheduler._preempt(b)
    assert b.status is SeqStatus.SWAPPED
    for rid in ("a", "b", "c", "missing"):
        dropped = sim.scheduler.abort(rid)
        assert all(s.status is SeqStatus.FINISHED for s in dropped)
    assert not sim.scheduler.has_unfinished() and sim.scheduler.live == []
    assert sim.scheduler.free_seats() == 4 and kv.ledger.owned == 0 and kv.pool.num_free == 8
    kv.check_invariants([])


def test_aborting_a_waiting_prompt_with_samples_to_come_gives_back_its_seats():
    sched = Scheduler(paged(), max_num_seqs=3, max_num_batched_tokens=64, enable_chunked_prefill=True,
                      preemption_mode="recompute")
    a = seq("a", 30, 4, n=3)
    sched.add(a)
    sched.schedule()
    assert sched.free_seats() == 0
    assert sched.abort("a") == [a]
    assert sched.free_seats() == 3 and not sched.running and not sched.has_unfinished()
    b = seq("b", 3, 3)
    sched.add(b)
    assert sched.live == [b] and sched.abort("b") == [b] and not sched.waiting


def test_scheduler_refuses_bad_preemption_modes():
    with pytest.raises(ValueError, match="preemption_mode must be recompute or swap, got 'evict'"):
        Scheduler(paged(), max_num_seqs=1, max_num_batched_tokens=1, enable_chunked_prefill=True, preemption_mode="evict")
    kv = ContiguousKVManager(100, reservation="oracle", allocator="first_fit", max_model_len=64)
    with pytest.raises(ValueError, match="ContiguousKVManager cannot swap: use preemption_mode=recompute"):
        Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=1, enable_chunked_prefill=True, preemption_mode="swap")
    with pytest.raises(NotImplementedError, match="ContiguousKVManager cannot swap"):
        kv.swap_out(seq("a", 1, 1))
    with pytest.raises(NotImplementedError, match="ContiguousKVManager cannot swap"):
        kv.swap_in(seq("a", 1, 1))


# -- random workloads ------------------------------------------------------------------------------------
request = st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(1, 3), st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(request, min_size=1, max_size=12),
       manager=st.sampled_from(["paged", "paged-swap", "paged-cache", "pow2", "oracle", "max"]),
       budget=st.integers(8, 40), seats=st.integers(3, 6), chunked=st.booleans(), steps=st.sampled_from([1, 3]))
def test_every_request_finishes_exactly_within_budget_seats_and_memory(requests, manager, budget, seats, chunked, steps):
    if manager.startswith("paged"):
        kv = PagedKVManager(24, 4, max_model_len=64, num_host_blocks=16 if manager == "paged-swap" else 0,
                            enable_prefix_caching=manager == "paged-cache")
    else:
        kv = ContiguousKVManager(160, reservation=manager, allocator="first_fit", max_model_len=64)
    sim = Sim(kv, max_num_seqs=seats, max_num_batched_tokens=budget, enable_chunked_prefill=True if not chunked else chunked,
              preemption_mode="swap" if manager == "paged-swap" else "recompute", num_scheduler_steps=steps)
    if not chunked:  # the engine's rule: without chunking the budget holds the longest sequence
        budget = 64
        sim.scheduler.token_budget = budget
        sim.scheduler.chunked = False
    expected = {}
    for i, (prompt, max_tokens, n, shared) in enumerate(requests):
        tokens = [7] * (4 * shared) + [(i * 13 + j) % 50 for j in range(prompt)]
        s = seq(f"r{i}", tokens[:30], max_tokens, n=min(n, seats), max_model_len=64)
        if not kv.can_ever_fit(s):
            continue
        sim.add(s)
        expected.update({(s.request.request_id, k): len(s.token_ids) + max_tokens for k in range(s.num_forks + 1)})
    for _ in range(2000):
        if not sim.scheduler.has_unfinished():
            break
        batch = sim.step()
        assert batch, "no progress"
        assert num_tokens(batch) + sum(k - 1 for k in batch.decode_steps) <= budget * steps
        assert num_tokens(batch) <= budget
        assert len(sim.scheduler.running) + sim.scheduler.num_pending_forks <= seats
        kv.check_invariants(sim.scheduler.live)
    assert not sim.scheduler.has_unfinished()
    assert {s.key: len(s.token_ids) for s in sim.finished} == expected
    stats = kv.kv_stats(None)
    assert stats.allocated == 0 and stats.free == stats.capacity and kv.ledger.owned == kv.ledger.stored == 0


# -- swapping back in, exactly -------------------------------------------------------------------------
def test_a_swapped_decode_comes_back_with_one_token_of_budget_and_just_the_room_it_needs():
    kv = paged(16, host=16)
    sim = Sim(kv, max_num_seqs=3, max_num_batched_tokens=4, preemption_mode="swap")
    a, b = sim.add(seq("a", 1, 20)), sim.add(seq("b", 3, 20))
    sim.step()  # a: 1 computed; b: 3 computed, its 4th token sampled
    sim.scheduler._preempt(b)  # as _make_room does: b's blocks go to the host
    c = sim.add(seq("c", 9, 3))
    batch = sim.step()
    assert decodes(batch) == ["a", "b"] and prefills(batch) == [("c", 2)]  # 4 - 1 - 1 tokens left for c
    assert kv.ledger.held(b) == 4  # room for its 4th token only: one block
    assert sim.scheduler.num_preemptions == 1


def test_a_swapped_sequence_returns_when_the_budget_has_exactly_one_token_left_and_not_at_zero():
    for budget, back in ((1, False), (2, True)):
        kv = paged(16, host=16)
        sim = Sim(kv, max_num_seqs=2, max_num_batched_tokens=2, preemption_mode="swap")
        a, b = sim.add(seq("a", 1, 20)), sim.add(seq("b", 1, 20))
        sim.step()
        sim.scheduler.token_budget = budget
        sim.scheduler._preempt(b)
        batch = sim.step()
        assert num_tokens(batch) <= budget and decodes(batch)[0] == "a"
        assert (b in batch.decodes) is back and (b.status is SeqStatus.RUNNING) is back, budget


def test_a_swapped_sequence_returns_into_the_last_free_seat():
    kv = paged(16, host=16)
    sim = Sim(kv, max_num_seqs=2, max_num_batched_tokens=8, preemption_mode="swap")
    a, b = sim.add(seq("a", 2, 20)), sim.add(seq("b", 2, 20))
    sim.step()
    sim.scheduler._preempt(b)
    assert sim.scheduler.free_seats() == 1
    assert decodes(sim.step()) == ["a", "b"]


def test_prompts_and_decodes_swapped_out_together_all_come_back_in_one_step():
    kv = paged(16, host=16)
    sim = Sim(kv, max_num_seqs=4, max_num_batched_tokens=8, preemption_mode="swap")
    a, b = sim.add(seq("a", 2, 20)), sim.add(seq("b", 11, 4))
    assert prefills(sim.step()) == [("a", 2), ("b", 6)]
    sim.scheduler._preempt(b)  # part-way through its prompt
    sim.scheduler._preempt(a)  # decoding
    c = sim.add(seq("c", 5, 2))
    batch = sim.step()  # b's last 5 prompt tokens, a's decode, and the 2 tokens left for c's first chunk
    assert prefills(batch) == [("b", 5), ("c", 2)] and decodes(batch) == ["a"]
    assert kv.ledger.held(b) == 12 and b.status is SeqStatus.RUNNING
    sim.run()
    assert len(b.token_ids) == 15 and b.token_ids[:11] == list(range(1, 12))


def test_without_chunking_a_prompt_of_exactly_the_budget_left_is_admitted():
    sim = Sim(paged(), max_num_batched_tokens=16, enable_chunked_prefill=False)
    sim.add(seq("a", 10, 5))
    sim.step()
    sim.add(seq("b", 15, 5))
    batch = sim.step()
    assert decodes(batch) == ["a"] and prefills(batch) == [("b", 15)]


def test_a_prompt_chunk_that_needs_memory_preempts_itself_not_the_newer_samples_already_scheduled():
    kv = paged(6)
    sim = Sim(kv, max_num_batched_tokens=8)
    p, a = sim.add(seq("p", 4, 5, n=3)), sim.add(seq("a", 20, 2))
    assert prefills(sim.step()) == [("p", 4), ("a", 4)]  # p's prompt done: its 2 samples join, newest
    batch = sim.step()  # p's 3 samples decode (a block each); a's chunk of 5 needs 2 blocks, 1 is free
    assert decodes(batch) == ["p", "p", "p"] and batch.preempted == [a] and not batch.prefills
    assert a.status is SeqStatus.WAITING and all(s.status is SeqStatus.RUNNING for s in batch.decodes)


def test_preemptions_are_counted_each_time():
    sim = Sim(paged(5))
    for rid in "abc":
        sim.add(seq(rid, 7, 10))
    sim.run()
    assert sim.scheduler.num_preemptions == sum(len(batch.preempted) for batch in sim.batches) >= 2


def test_one_step_per_call_unless_asked_and_two_when_asked():
    kv = paged()
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=True,
                      preemption_mode="recompute")
    sim = Sim(kv)
    sim.scheduler = sched
    sim.add(seq("a", 3, 10))
    sim.step()
    assert sim.step().decode_steps == [1]
    sim2 = Sim(paged(), num_scheduler_steps=2)
    sim2.add(seq("a", 3, 10))
    sim2.step()
    assert sim2.step().decode_steps == [2]


def test_a_prompt_is_looked_up_in_the_prefix_cache_only_when_there_is_budget_to_admit_it():
    kv = paged(caching=True)
    sim = Sim(kv, max_num_batched_tokens=8)
    sim.add(seq("a", 8, 2))
    sim.add(seq("b", 6, 2))
    sim.step()  # a takes the whole budget: b is not even looked up
    assert kv.num_prefix_queries == 8
    sim.step()
    assert kv.num_prefix_queries == 14
