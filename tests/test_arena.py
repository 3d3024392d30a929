"""The contiguous arena allocator: holes, coalescing, fragmentation, and no slot lost or shared."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.kv.arena import Arena
from engines.kv.contiguous_manager import next_pow2


def test_first_fit_takes_the_first_hole_best_fit_the_tightest():
    for policy, expected in (("first_fit", 0), ("best_fit", 60)):
        a = Arena(100, policy)
        regions = [a.allocate(n) for n in (20, 10, 30, 15, 25)]  # 0, 20, 30, 60, 75
        assert regions == [0, 20, 30, 60, 75]
        a.free(0, 20)
        a.free(60, 15)
        assert a.allocate(12) == expected, policy


def test_free_coalesces_neighbours_and_external_fragmentation():
    a = Arena(100)
    starts = [a.allocate(25) for _ in range(4)]
    assert a.allocate(1) is None
    a.free(starts[0], 25)
    a.free(starts[2], 25)
    assert a.num_free == 50 and a.largest_free_extent == 25  # 25 slots are free but unusable for a 50-slot request
    assert a.allocate(50) is None
    a.free(starts[1], 25)  # bridges the two holes
    assert a.starts == [0] and a.lengths == [75] and a.largest_free_extent == 75
    assert a.allocate(50) == 0


def test_extend_in_place_only_into_adjacent_free_space():
    a = Arena(50)
    first = a.allocate(10)
    second = a.allocate(10)
    assert not a.extend(first, 10, 5)  # the next region is in the way
    assert a.extend(second, 10, 30) and a.num_free == 0
    a.free(first, 10)
    with pytest.raises(ValueError, match="overlaps"):
        a.free(5, 10)  # a double free of half of it
    a.free(second, 40)
    with pytest.raises(ValueError, match="overlaps"):
        a.free(second, 10)


def test_next_pow2():
    assert [next_pow2(n) for n in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["first_fit", "best_fit"]),
       st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 1000)), max_size=80))
def test_random_histories_never_overlap_or_lose_a_slot(policy, history):
    capacity = 256
    a = Arena(capacity, policy)
    live: dict[int, int] = {}
    for alloc, size, pick in history:
        if alloc or not live:
            start = a.allocate(size)
            if start is None:
                assert a.largest_free_extent < size
                continue
            live[start] = size
        else:
            start = sorted(live)[pick % len(live)]
            a.free(start, live.pop(start))
        spans = sorted(list(live.items()) + list(zip(a.starts, a.lengths)))
        pos = 0
        for s, n in spans:
            assert s == pos, "a gap or an overlap"
            pos += n
        assert pos == capacity
        assert all(a.starts[i] + a.lengths[i] < a.starts[i + 1] for i in range(len(a.starts) - 1)), "uncoalesced"


def test_unknown_allocator_is_refused():
    with pytest.raises(ValueError, match=r"^unknown allocator 'next_fit'; choose one of first_fit, best_fit$"):
        Arena(10, "next_fit")


def test_freeing_into_the_free_extent_after_it_is_refused():
    a = Arena(50)
    assert a.allocate(10) == 0 and a.allocate(10) == 10  # [20, 50) free
    with pytest.raises(ValueError, match=r"^freeing \[15, 25\) overlaps a free extent$"):
        a.free(15, 10)
    a.free(0, 10)
    with pytest.raises(ValueError, match=r"^freeing \[5, 15\) overlaps a free extent$"):
        a.free(5, 10)
    assert a.num_free == 40
