"""The KV breakdown on hand-built KV logs (docs/methodology.md, "KV memory")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engines.base import KVStats
from engines.kv.accounting import Allocation, KVLog
from harness.bench.kv_breakdown import final_lengths, internal_per_sample, kv_steps, summarize, time_weighted_mean
from harness.bench.runner import SampleRecord

START = 100.0  # the run's clock does not start at 0


def _history() -> tuple[KVLog, list[SampleRecord]]:
    """An arena of 100 slots. A (prompt 4, 5 output tokens: fills 8 slots) reserved 10 and B (prompt 2,
    3 output tokens: fills 4 slots) reserved 20, both admitted in step 0; B is freed after step 1, A after step 2.
    Samples come after each step's admissions, at t = 0, 1, 3, 4 (plus START)."""
    samples = [SampleRecord("A", 0, 4, START, token_times=[START + t for t in (1, 2, 3, 3.5, 4)], finish=START + 4),
               SampleRecord("B", 0, 2, START, token_times=[START + t for t in (1, 2, 3)], finish=START + 3)]
    stats = [
        KVStats(100, 0, 30, 70, 60, external=10, num_running=2, num_preemptions=5),
        KVStats(100, 6, 30, 70, 60, external=10, num_running=2, num_preemptions=6),
        KVStats(100, 6, 10, 90, 90, num_running=1, num_preemptions=7),
        KVStats(100, 0, 0, 100, 100, num_preemptions=7),
    ]
    log = KVLog(
        samples=[(7 + i, START + t, s) for i, (t, s) in enumerate(zip((0.0, 1.0, 3.0, 4.0), stats))],
        allocations=[Allocation(7, "A", 0, 10, 0), Allocation(7, "B", 0, 20, 0), Allocation(9, "B", 0, 0, 4),
                     Allocation(10, "A", 0, 0, 8)],
        baseline=KVStats(100, 0, 0, 100, 100, num_preemptions=5),
    )
    return log, samples


def test_final_length_is_prompt_plus_output_minus_one_or_the_most_ever_stored():
    log, samples = _history()
    assert final_lengths(samples, log) == {("A", 0): 8, ("B", 0): 4}
    log.allocations.append(Allocation(11, "A", 0, 0, 9))  # an engine that stored more than that
    assert final_lengths(samples, log)[("A", 0)] == 9


def test_breakdown_by_hand():
    log, samples = _history()
    steps = kv_steps(log, samples, START)
    # internal: A 10 - 8 = 2 while it holds its region (samples 0-2), B 20 - 4 = 16 (samples 0-1)
    assert steps["internal"].tolist() == [18, 18, 2, 0]
    # reservation: allocated - token states - internal; A: min(10, 8) - stored, B: min(20, 4) - stored
    assert steps["reservation"].tolist() == [12, 6, 2, 0]
    assert steps["token_states"].tolist() == [0, 6, 6, 0]
    assert steps["external"].tolist() == [10, 10, 0, 0]
    assert steps["t_s"].tolist() == [0.0, 1.0, 3.0, 4.0]
    assert steps["step"].tolist() == [7, 8, 9, 10]
    assert steps["preemptions"].tolist() == [0, 1, 2, 2]  # counted from the baseline, not the first sample


def test_an_allocation_counts_from_the_sample_that_first_shows_it_until_the_next_change():
    steps = np.array([3, 4, 5, 6, 7])
    log = KVLog(allocations=[
        Allocation(3, "C", 0, 16, 0),   # held from sample 3
        Allocation(4, "C", 0, 0, 5),    # preempted before sample 4
        Allocation(5, "C", 0, 32, 0),   # back before sample 5 ...
        Allocation(5, "C", 0, 48, 0),   # ... and grown in the same step: 48 is what sample 5 shows
        Allocation(7, "C", 0, 0, 12),   # freed before sample 7
        Allocation(6, "D", 0, 64, 10),  # another sequence, logged out of order with C's
    ])
    internal = internal_per_sample(log, steps, {("C", 0): 12, ("D", 0): 60})
    assert internal.tolist() == [4, 0, 36, 36 + 4, 4]


def test_no_allocations_no_internal_fragmentation():
    assert internal_per_sample(KVLog(), np.array([0, 1]), {}).tolist() == [0, 0]


def test_an_engine_without_a_breakdown_gets_nan_parts_and_nan_fractions():
    log, samples = _history()
    log.breakdown = False
    steps = kv_steps(log, samples, START)
    assert steps[["token_states", "reservation", "internal", "external"]].isna().all().all()
    s = summarize(steps, 6.0, log.breakdown)
    assert s["kv_breakdown"] is False
    assert math.isnan(s["kv_token_states_frac"]) and math.isnan(s["kv_waste"]) and math.isnan(s["kv_fragmentation"])
    assert s["kv_mean_allocated"] == pytest.approx((30 * 1 + 30 * 2 + 10 * 1) / 6)  # what it does know


def test_an_empty_log_gives_an_empty_table_and_nan_figures():
    steps = kv_steps(KVLog(), [], START)
    assert steps.empty and "token_states" in steps
    s = summarize(steps, 1.0, True)
    assert math.isnan(s["kv_mean_token_states"]) and math.isnan(s["kv_waste"])
    assert math.isnan(s["max_running"]) and math.isnan(s["preemptions"])


def test_time_weighted_mean_holds_each_value_until_the_next_sample():
    times = np.array([1.0, 2.0, 4.0])
    values = np.array([10.0, 20.0, 40.0])
    # nothing before the first sample, then each value until the next, the last until the end
    assert time_weighted_mean(times, values, 0.0, 5.0) == pytest.approx((0 + 10 * 1 + 20 * 2 + 40 * 1) / 5)
    assert time_weighted_mean(times, values, 0.0, 3.0) == pytest.approx((10 + 20) / 3)
    assert math.isnan(time_weighted_mean(times, values, 2.0, 2.0))


def test_time_weighted_summary_of_the_history():
    log, samples = _history()
    steps = kv_steps(log, samples, START)
    s = summarize(steps, duration=6.0, breakdown=True)
    # samples hold 0-1, 1-3, 3-4, 4-6
    assert s["kv_mean_token_states"] == pytest.approx((0 + 6 * 2 + 6 + 0) / 6)
    assert s["kv_mean_reservation"] == pytest.approx((12 + 6 * 2 + 2 + 0) / 6)
    assert s["kv_mean_internal"] == pytest.approx((18 + 18 * 2 + 2 + 0) / 6)
    assert s["kv_mean_external"] == pytest.approx((10 + 10 * 2) / 6)
    assert s["kv_token_states_frac"] == pytest.approx(s["kv_mean_token_states"] / 100)
    assert s["kv_fragmentation"] == pytest.approx((s["kv_mean_internal"] + s["kv_mean_external"]) / 100)
    assert s["kv_waste"] == pytest.approx((s["kv_mean_reservation"] + s["kv_mean_internal"] + s["kv_mean_external"]) / 100)
    used = sum(s[f"kv_mean_{c}"] for c in ("token_states", "reservation", "internal", "external"))
    assert s["kv_token_states_used_frac"] == pytest.approx(s["kv_mean_token_states"] / used)
    assert s["kv_internal_used_frac"] == pytest.approx(s["kv_mean_internal"] / used)
    assert s["kv_peak_allocated_frac"] == pytest.approx(0.3)
    assert (s["max_running"], s["preemptions"]) == (2, 2)
    assert s["kv_breakdown"] is True


def test_final_length_without_logged_stores_and_of_a_sample_without_tokens():
    samples = [SampleRecord("A", 0, 4, START, token_times=[START + 1, START + 2, START + 3]),
               SampleRecord("B", 0, 6, START)]
    log = KVLog(allocations=[Allocation(0, "A", 0, 16, 0), Allocation(0, "X", 0, 8, 0), Allocation(1, "Y", 0, 0, 3)])
    # A: 4 + 3 - 1; B: its prompt (no token sampled); X, Y: sequences with no sample, what they stored
    assert final_lengths(samples, log) == {("A", 0): 6, ("B", 0): 6, ("X", 0): 0, ("Y", 0): 3}


def test_an_allocation_of_a_sequence_of_unknown_length_is_all_internal():
    internal = internal_per_sample(KVLog(allocations=[Allocation(0, "Z", 0, 8, 0)]), np.array([0, 1]), {})
    assert internal.tolist() == [8, 8]


def test_counters_count_from_zero_when_the_log_has_no_baseline():
    log, samples = _history()
    log.baseline = None
    steps = kv_steps(log, samples, START)
    assert steps["preemptions"].tolist() == [5, 6, 7, 7]


def test_an_engine_without_a_breakdown_has_float_nan_parts():
    log, samples = _history()
    log.breakdown = False
    steps = kv_steps(log, samples, START)
    for part in ("token_states", "reservation", "internal", "external"):
        assert np.isnan(steps[part].to_numpy(dtype=float)).all() and steps[part].dtype == float, part


def test_time_weighted_mean_over_a_window_that_does_not_start_at_zero():
    times = np.array([1.0, 2.0, 4.0])
    values = np.array([10.0, 20.0, 40.0])
    assert time_weighted_mean(times, values, 2.0, 5.0) == pytest.approx((20 * 2 + 40 * 1) / 3)
    assert time_weighted_mean(times, values, 1.5, 3.0) == pytest.approx((10 * 0.5 + 20 * 1) / 1.5)
    assert math.isnan(time_weighted_mean(np.array([]), np.array([]), 0.0, 1.0))


def _steps(rows: list[tuple[float, int, int, int, int]]):
    """Hand-built kv_steps rows: (t_s, capacity, allocated, token_states, num_running)."""
    import pandas as pd

    n = len(rows)
    return pd.DataFrame({
        "t_s": [r[0] for r in rows], "capacity": [r[1] for r in rows], "allocated": [r[2] for r in rows],
        "token_states": [r[3] for r in rows], "reservation": [0] * n, "internal": [0] * n, "external": [0] * n,
        "num_running": [r[4] for r in rows], "preemptions": [0] * n, "prefix_cache_queries": [0] * n,
        "prefix_cache_hits": [0] * n,
    })


def test_capacity_counts_from_the_start_even_if_the_first_sample_comes_late_and_when_it_changes():
    s = summarize(_steps([(2.0, 100, 10, 10, 1), (3.0, 200, 10, 10, 1)]), 4.0, True)
    assert s["kv_mean_capacity"] == pytest.approx((100 * 3 + 200 * 1) / 4)
    assert s["kv_mean_token_states"] == pytest.approx(10 * 2 / 4)  # nothing is held before the first sample


def test_fractions_of_memory_in_use_are_undefined_only_when_nothing_was_in_use():
    nothing = summarize(_steps([(0.0, 100, 0, 0, 0), (1.0, 100, 0, 0, 0)]), 2.0, True)
    assert math.isnan(nothing["kv_token_states_used_frac"]) and nothing["kv_token_states_frac"] == 0.0
    little = summarize(_steps([(0.0, 100, 0, 0, 0), (3.0, 100, 1, 1, 1)]), 4.0, True)  # 1 slot for a quarter
    assert little["kv_token_states_used_frac"] == pytest.approx(1.0)
    assert little["kv_token_states_frac"] == pytest.approx(0.25 / 100)


def test_peak_allocated_share_skips_samples_without_a_capacity():
    s = summarize(_steps([(0.0, 0, 5, 0, 1), (1.0, 1, 1, 1, 1), (2.0, 4, 1, 1, 1)]), 3.0, True)
    assert s["kv_peak_allocated_frac"] == pytest.approx(1.0)
    assert math.isnan(summarize(_steps([(0.0, 0, 5, 0, 1)]), 1.0, True)["kv_peak_allocated_frac"])


def test_run_counts_come_from_the_last_sample_and_the_hit_rate_from_its_counters():
    steps = _steps([(0.0, 100, 10, 10, 3), (1.0, 100, 10, 10, 2)])
    steps["preemptions"] = [1, 4]
    steps["prefix_cache_queries"] = [10, 40]
    steps["prefix_cache_hits"] = [5, 30]
    s = summarize(steps, 2.0, True)
    assert (s["max_running"], s["preemptions"], s["prefix_cache_hit_rate"]) == (3, 4, 0.75)
    steps["prefix_cache_queries"] = [0, 0]
    steps["prefix_cache_hits"] = [0, 0]
    assert math.isnan(summarize(steps, 2.0, True)["prefix_cache_hit_rate"])
    empty = summarize(kv_steps(KVLog(), [], START), 1.0, True)
    assert math.isnan(empty["prefix_cache_hit_rate"]) and math.isnan(empty["max_running"])
