"""Metric computations against hand-computed values (DESIGN.md's definitions)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness.metrics import goodput_requests, inter_token_latencies, latency_stats, request_table, summarize, tpot
from harness.runner import RunRecord, SampleRecord


def test_percentiles_interpolate_linearly_between_order_statistics():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 10.0], "x")
    # rank = p/100 * (n-1): p50 -> 2 -> 3.0; p90 -> 3.6 -> 4 + 0.6*6; p95 -> 3.8 -> 4 + 0.8*6; p99 -> 3.96 -> 4 + 0.96*6
    assert stats == pytest.approx({"x_mean": 4.0, "x_p50": 3.0, "x_p90": 7.6, "x_p95": 8.8, "x_p99": 9.76})


def test_statistics_skip_undefined_values_and_are_nan_when_none_remain():
    assert latency_stats([2.0, math.nan, None, 4.0], "t")["t_mean"] == 3.0
    assert all(math.isnan(v) for v in latency_stats([math.nan], "t").values())


def test_tpot_is_undefined_for_a_one_token_output():
    assert math.isnan(tpot(1.0, 1.0, 1))
    assert tpot(1.0, 2.0, 5) == pytest.approx(0.25)


def _record() -> RunRecord:
    # request 0: arrives 0, scheduled 0.5, tokens at 1, 2, 4 -> TTFT 1, TPOT (4-1)/2 = 1.5, E2E 4, queue 0.5
    # request 1: arrives 1, scheduled 1.0, one token at 3 -> TTFT 2, TPOT undefined, E2E 2, queue 0
    # request 2: arrives 2, fails with an error after one token at 5
    samples = [
        SampleRecord("0", 0, 10, 0.0, 0.5, [1.0, 2.0, 4.0], 4.0, "length"),
        SampleRecord("1", 0, 20, 1.0, 1.0, [3.0], 3.0, "length"),
        SampleRecord("2", 0, 30, 2.0, 2.5, [5.0], 5.0, "error", "boom"),
    ]
    return RunRecord(start=0.0, end=5.0, samples=samples, kv=[], max_in_flight=3)


def test_request_table_and_summary_match_hand_values():
    table = request_table(_record())
    assert table["ttft_s"].tolist() == [1.0, 2.0, 3.0]
    assert table["e2e_s"].tolist() == [4.0, 2.0, 3.0]
    assert table["queue_s"].tolist() == [0.5, 0.0, 0.5]
    assert table["tpot_s"].iloc[0] == 1.5 and table["tpot_s"].iloc[1:].isna().all()
    assert sorted(inter_token_latencies(table).tolist()) == [1.0, 2.0]
    s = summarize(table, duration=5.0, ttft_slo=1.5, tpot_slo=2.0)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["output_tokens"] == 5 and s["prompt_tokens"] == 60
    assert s["output_tok_s"] == pytest.approx(1.0)
    assert s["total_tok_s"] == pytest.approx(13.0)
    assert s["requests_s"] == pytest.approx(0.4)
    assert s["goodput_req_s"] == pytest.approx(0.2)  # only request 0 meets TTFT <= 1.5
    assert s["tpot_mean"] == 1.5 and s["ttft_p50"] == 2.0 and s["itl_mean"] == 1.5


def test_goodput_applies_both_slos_and_needs_every_sample():
    table = pd.DataFrame({
        "request_id": ["a", "b", "c", "c", "d"],
        "ttft_s": [0.1, 0.1, 0.1, 0.1, 0.9],
        "tpot_s": [0.05, 0.5, 0.05, 0.3, np.nan],
        "finish_reason": ["length", "stop", "length", "length", "length"],
    })
    assert goodput_requests(table, 0.5, 0.1) == 1  # a; b too slow per token; c has a slow sample; d slow first token
    assert goodput_requests(table, 1.0, 0.1) == 2  # d too (one token: no TPOT to miss)
    assert goodput_requests(table, None, None) == 4
    table.loc[0, "finish_reason"] = "abort"
    assert goodput_requests(table, None, None) == 3
