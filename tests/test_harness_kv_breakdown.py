"""The KV breakdown on a hand-built allocation history."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import KVStats
from harness.kv_breakdown import breakdown, final_lengths, kv_steps, summarize, time_weighted_mean
from harness.runner import KVSample, SampleRecord


def _history() -> tuple[list[KVSample], list[SampleRecord]]:
    """An arena of 100 slots; sequence A (prompt 4, 5 output tokens: fills 8 slots) reserved 10,
    sequence B (prompt 2, 3 output tokens: fills 4 slots) reserved 20; B's region leaves a hole."""
    samples = [SampleRecord("A", 0, 4, 0.0, token_times=[1, 2, 3, 4, 5], finish=5.0),
               SampleRecord("B", 0, 2, 0.0, token_times=[1, 2, 3], finish=3.0)]
    kv = [
        KVSample(0.0, KVStats(100, 0, 0, 100, 100)),
        KVSample(1.0, KVStats(100, 6, 30, 70, 50, sequences={("A", 0): (4, 10), ("B", 0): (2, 20)})),
        KVSample(3.0, KVStats(100, 10, 30, 70, 50, sequences={("A", 0): (6, 10), ("B", 0): (4, 20)})),
        KVSample(4.0, KVStats(100, 7, 10, 90, 70, sequences={("A", 0): (7, 10)})),
        KVSample(6.0, KVStats(100, 0, 0, 100, 100)),
    ]
    return kv, samples


def test_final_length_is_prompt_plus_output_minus_one():
    kv, samples = _history()
    assert final_lengths(samples, kv) == {("A", 0): 8, ("B", 0): 4}


def test_breakdown_by_hand():
    kv, samples = _history()
    final = final_lengths(samples, kv)
    b = breakdown(kv[1], final)
    # A: reservation min(10, 8) - 4 = 4, internal 10 - 8 = 2; B: reservation 4 - 2 = 2, internal 20 - 4 = 16
    assert (b.token_states, b.reservation, b.internal, b.external) == (6, 6, 18, 20)
    b = breakdown(kv[2], final)
    assert (b.token_states, b.reservation, b.internal, b.external) == (10, 2, 18, 20)
    b = breakdown(kv[3], final)
    assert (b.token_states, b.reservation, b.internal, b.external) == (7, 1, 2, 20)


def test_reported_stored_beyond_the_final_length_is_never_negative():
    final = {("A", 0): 8}
    b = breakdown(KVSample(0.0, KVStats(20, 9, 10, 10, 10, sequences={("A", 0): (9, 10)})), final)
    assert (b.reservation, b.internal) == (0, 1)


def test_time_weighted_mean_holds_each_value_until_the_next_sample():
    times = np.array([0.0, 1.0, 3.0])
    values = np.array([10.0, 20.0, 40.0])
    assert time_weighted_mean(times, values, 0.0, 4.0) == pytest.approx((10 * 1 + 20 * 2 + 40 * 1) / 4)
    assert time_weighted_mean(times, values, 0.0, 2.0) == pytest.approx((10 + 20) / 2)


def test_time_weighted_summary_of_the_history():
    kv, samples = _history()
    steps = kv_steps(kv, samples, start=0.0)
    s = summarize(steps, duration=6.0)
    # token states 0 (0-1), 6 (1-3), 10 (3-4), 7 (4-6), 0 (6-)
    assert s["kv_mean_token_states"] == pytest.approx((6 * 2 + 10 + 7 * 2) / 6)
    assert s["kv_mean_reservation"] == pytest.approx((6 * 2 + 2 + 1 * 2) / 6)
    assert s["kv_mean_internal"] == pytest.approx((18 * 2 + 18 + 2 * 2) / 6)
    assert s["kv_mean_external"] == pytest.approx((20 * 2 + 20 + 20 * 2) / 6)
    assert s["kv_token_states_frac"] == pytest.approx(s["kv_mean_token_states"] / 100)
    assert s["kv_fragmentation"] == pytest.approx((s["kv_mean_internal"] + s["kv_mean_external"]) / 100)
    assert s["kv_waste"] == pytest.approx((s["kv_mean_reservation"] + s["kv_mean_internal"] + s["kv_mean_external"]) / 100)
    used = sum(s[f"kv_mean_{c}"] for c in ("token_states", "reservation", "internal", "external"))
    assert s["kv_token_states_used_frac"] == pytest.approx(s["kv_mean_token_states"] / used)
    assert s["kv_peak_allocated_frac"] == pytest.approx(0.3)
