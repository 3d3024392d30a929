"""Medians and ratios with bootstrap intervals, on hand-checkable samples."""

from __future__ import annotations

import math

import pytest

from harness.bench.stats import Estimate, median_ci, ratio_ci


def test_three_repeats_give_their_median_and_their_range():
    # a resampled median is the smallest value with probability 7/27 (> 2.5%): both tails hit the extremes
    assert median_ci([18019.0, 16345.0, 16745.0]) == Estimate(16745.0, 16345.0, 18019.0)


def test_two_repeats_give_their_mean_and_their_range():
    assert median_ci([1.0, 3.0]) == Estimate(2.0, 1.0, 3.0)


def test_one_value_has_no_interval():
    e = median_ci([5.0])
    assert e.value == 5.0 and math.isnan(e.low) and math.isnan(e.high) and not e.has_interval


def test_nans_are_dropped_and_nothing_left_is_nan():
    assert median_ci([1.0, math.nan, 3.0]) == Estimate(2.0, 1.0, 3.0)
    assert math.isnan(median_ci([math.nan]).value) and math.isnan(median_ci([]).value)


def test_equal_values_have_a_zero_width_interval():
    assert median_ci([2.0, 2.0, 2.0]) == Estimate(2.0, 2.0, 2.0)


def test_many_values_give_an_interval_much_narrower_than_their_range():
    # median of 0..100: the 95% interval is about 50 +- 1.96 * sqrt(101) / 2 ranks, i.e. 40..60
    e = median_ci(range(101))
    assert e.value == 50.0
    assert 38 <= e.low <= 44 and 56 <= e.high <= 62


def test_intervals_are_reproducible_and_narrow_with_the_confidence():
    assert median_ci(range(101)) == median_ci(range(101))
    wide, narrow = median_ci(range(101)), median_ci(range(101), confidence=0.5)
    assert wide.low < narrow.low < 50 < narrow.high < wide.high


def test_ratio_of_three_against_three_resamples_each_group_independently():
    # independent resampling reaches min(a) / max(b) and max(a) / min(b); a paired one would stop at 1/4 and 1/2
    e = ratio_ci([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert e.value == pytest.approx(0.4)
    assert e.low == pytest.approx(1 / 6) and e.high == pytest.approx(3 / 4)


def test_ratio_with_a_single_run_on_either_side_has_no_interval():
    for a, b in (([2.0], [4.0, 5.0, 6.0]), ([1.0, 2.0, 3.0], [5.0])):
        e = ratio_ci(a, b)
        assert not e.has_interval
    assert ratio_ci([2.0], [4.0, 5.0, 6.0]).value == pytest.approx(0.4)


def test_ratio_against_a_zero_median_is_nan():
    assert math.isnan(ratio_ci([1.0, 2.0], [0.0, 0.0, 1.0]).value)
    assert math.isnan(ratio_ci([], [1.0]).value)


def test_contains():
    assert Estimate(1.0, 0.9, 1.1).contains(1.0)
    assert not Estimate(1.2, 1.1, 1.3).contains(1.0)
    assert not Estimate(1.0).contains(1.0)
