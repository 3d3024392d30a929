"""Metric computations against hand-computed values (docs/methodology.md's definitions)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from engines.kv.accounting import KVLog
from harness.bench.metrics import (
    REQUEST_COLUMNS,
    delivery_times,
    goodput_requests,
    inter_token_latencies,
    latency_stats,
    request_outcomes,
    request_table,
    summarize,
    tpot,
)
from harness.bench.runner import RunRecord, SampleRecord

START = 10.0  # the run's clock does not start at 0


def test_percentiles_interpolate_linearly_between_order_statistics():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 10.0], "x")
    # rank = p/100 * (n-1): p50 -> 2 -> 3.0; p90 -> 3.6 -> 4 + 0.6*6; p95 -> 3.8 -> 4 + 0.8*6; p99 -> 3.96 -> 4 + 0.96*6
    assert stats == pytest.approx({"x_mean": 4.0, "x_p50": 3.0, "x_p90": 7.6, "x_p95": 8.8, "x_p99": 9.76})


def test_statistics_skip_undefined_values_and_are_nan_when_none_remain():
    assert latency_stats([2.0, math.nan, None, 4.0], "t")["t_mean"] == 3.0
    assert all(math.isnan(v) for v in latency_stats([math.nan], "t").values())


def test_tpot_is_e2e_minus_ttft_over_the_tokens_after_the_first():
    assert math.isnan(tpot(1.0, 1.0, 1))
    assert tpot(1.0, 2.0, 5) == pytest.approx(0.25)
    assert tpot(1.0, 4.0, 2) == pytest.approx(3.0)


def test_deliveries_are_runs_of_one_timestamp():
    assert delivery_times([1.0, 1.0, 1.0, 2.5, 2.5, 4.0]).tolist() == [1.0, 2.5, 4.0]
    assert delivery_times([]).tolist() == []


def _record() -> RunRecord:
    """Arrivals, scheduling and token times relative to START:
    0: arrives 0, scheduled 0.5, tokens at 1, 2, 4 -> TTFT 1, TPOT (4-1)/2 = 1.5, E2E 4, queue 0.5
    1: arrives 1, scheduled 1.0, one token at 3 -> TTFT 2, TPOT undefined, E2E 2, queue 0
    2: arrives 2, fails with an error after one token at 5 (not counted, but counted as failed)
    3: arrives 2, aborted after two tokens (not counted, but counted as aborted)
    4: arrives 3, multi-step decode: tokens at 4 (one), then 6, 6, 6, 6 (a delivery of four), then 7 -> ITL 2 and 1
    """
    t = (lambda *xs: [START + x for x in xs])
    samples = [
        SampleRecord("0", 0, 10, START + 0.0, START + 0.5, t(1.0, 2.0, 4.0), START + 4.0, "length"),
        SampleRecord("1", 0, 20, START + 1.0, START + 1.0, t(3.0), START + 3.0, "length"),
        SampleRecord("2", 0, 30, START + 2.0, START + 2.5, t(5.0), START + 5.0, "error", "boom"),
        SampleRecord("3", 0, 40, START + 2.0, START + 2.0, t(2.5, 3.0), START + 3.0, "abort"),
        SampleRecord("4", 0, 5, START + 3.0, START + 3.0, t(4.0, 6.0, 6.0, 6.0, 6.0, 7.0), START + 7.0, "stop"),
    ]
    return RunRecord(start=START, end=START + 8.0, samples=samples, kv=KVLog(), max_in_flight=3)


def test_request_table_times_are_relative_to_the_start():
    table = request_table(_record())
    assert table["arrival_s"].tolist() == [0.0, 1.0, 2.0, 2.0, 3.0]
    assert table["ttft_s"].tolist() == [1.0, 2.0, 3.0, 0.5, 1.0]
    assert table["e2e_s"].tolist() == [4.0, 2.0, 3.0, 1.0, 4.0]
    assert table["queue_s"].tolist() == [0.5, 0.0, 0.5, 0.0, 0.0]
    assert table["finish_s"].tolist() == [4.0, 3.0, 5.0, 3.0, 7.0]
    assert table["tpot_s"].iloc[0] == 1.5 and table["tpot_s"].iloc[1:3].isna().all()
    assert table["tpot_s"].iloc[4] == pytest.approx(3.0 / 5)
    assert table["deliveries"].tolist() == [3, 1, 1, 2, 3]
    assert table["token_times_s"].iloc[0] == [1.0, 2.0, 4.0]


def test_itl_counts_each_gap_between_deliveries_once():
    table = request_table(_record())
    assert sorted(inter_token_latencies(table.iloc[[0, 1, 4]]).tolist()) == [1.0, 1.0, 2.0, 2.0]


def test_summary_counts_successful_requests_only():
    s = summarize(request_table(_record()), duration=8.0, ttft_slo=1.5, tpot_slo=2.0)
    assert (s["num_requests"], s["completed"], s["failed"], s["aborted"]) == (5, 3, 1, 1)
    assert s["output_tokens"] == 3 + 1 + 6 and s["prompt_tokens"] == 10 + 20 + 5
    assert s["output_tok_s"] == pytest.approx(10 / 8)
    assert s["total_tok_s"] == pytest.approx(45 / 8)
    assert s["requests_s"] == pytest.approx(3 / 8)
    assert s["goodput_req_s"] == pytest.approx(2 / 8)  # 0 and 4 meet TTFT <= 1.5 (1 takes 2 s)
    assert s["ttft_mean"] == pytest.approx(4 / 3) and s["ttft_p50"] == 1.0
    assert s["tpot_mean"] == pytest.approx((1.5 + 0.6) / 2)
    assert s["e2e_mean"] == pytest.approx(10 / 3)
    assert s["queue_mean"] == pytest.approx(0.5 / 3)
    assert s["itl_mean"] == pytest.approx(6 / 4) and s["itl_p50"] == pytest.approx(1.5)
    assert s["duration_s"] == 8.0 and math.isnan(s["slo_e2e_s"])


def test_summary_of_nothing_successful_has_no_latencies_and_no_throughput():
    record = _record()
    record.samples = record.samples[2:4]
    s = summarize(request_table(record), 8.0, None, None)
    assert (s["completed"], s["failed"], s["aborted"], s["output_tokens"]) == (0, 1, 1, 0)
    assert s["output_tok_s"] == 0.0 and math.isnan(s["ttft_p95"]) and math.isnan(s["itl_mean"])


def test_request_outcomes_need_every_sample():
    table = pd.DataFrame({"request_id": ["a", "a", "b", "b", "c", "d"],
                          "finish_reason": ["length", "abort", "length", "error", None, "stop"]})
    assert request_outcomes(table) == {"num_requests": 4, "completed": 1, "aborted": 1, "failed": 2}


def test_goodput_applies_every_slo_and_needs_every_sample():
    table = pd.DataFrame({
        "request_id": ["a", "b", "c", "c", "d", "e"],
        "ttft_s": [0.1, 0.1, 0.1, 0.1, 0.9, 0.5],
        "tpot_s": [0.05, 0.5, 0.05, 0.3, np.nan, 0.1],
        "e2e_s": [1.0, 5.0, 1.0, 4.0, 0.9, 2.0],
        "finish_reason": ["length", "stop", "length", "length", "length", "length"],
    })
    assert goodput_requests(table, 0.5, 0.1) == 2  # a, e (exactly at both limits); b slow per token; c a slow sample; d
    assert goodput_requests(table, 1.0, 0.1) == 3  # d too (one token: no TPOT to miss)
    assert goodput_requests(table, None, None) == 5
    assert goodput_requests(table, None, None, e2e_slo=2.0) == 3  # a, d, e (exactly at the limit)
    assert goodput_requests(table, None, None, e2e_slo=1.99) == 2
    table.loc[0, "finish_reason"] = "abort"
    assert goodput_requests(table, None, None) == 4


def test_every_column_of_a_sample_and_undefined_times_for_a_sample_that_never_ran():
    record = _record()
    record.samples[0].cached_tokens = 8
    record.samples.append(SampleRecord("5", 1, 7, START + 6.0, finish_reason="error", error="refused"))
    table = request_table(record)
    first = table.iloc[0]
    assert (first["sample"], first["cached_tokens"], first["first_scheduled_s"], first["first_token_s"]) == (0, 8, 0.5, 1.0)
    never = table.iloc[-1]
    assert (never["request_id"], never["sample"], never["prompt_tokens"], never["output_tokens"]) == ("5", 1, 7, 0)
    assert never["arrival_s"] == 6.0 and never["error"] == "refused" and never["deliveries"] == 0
    for column in ("first_scheduled_s", "first_token_s", "finish_s", "ttft_s", "tpot_s", "e2e_s", "queue_s"):
        assert math.isnan(never[column]), column
    assert never["token_times_s"] == []
    s = summarize(table, 8.0, None, None)
    assert (s["num_requests"], s["failed"]) == (6, 2)


def test_an_empty_run_has_every_column_and_no_figures():
    table = request_table(RunRecord(start=START, end=START + 1.0, samples=[], kv=KVLog(), max_in_flight=0))
    assert list(table.columns) == list(REQUEST_COLUMNS) and table.empty


def test_goodput_with_an_e2e_limit_still_needs_success_and_the_other_limits():
    table = pd.DataFrame({
        "request_id": ["a", "b", "c"],
        "ttft_s": [0.1, 0.9, 0.1],
        "tpot_s": [0.05, 0.05, 0.05],
        "e2e_s": [1.0, 1.0, 1.0],
        "finish_reason": ["length", "length", "error"],
    })
    assert goodput_requests(table, 0.5, None, e2e_slo=2.0) == 1  # b misses TTFT, c failed
    assert goodput_requests(table, None, 0.01, e2e_slo=2.0) == 0


def test_summary_applies_each_slo_it_is_given_and_records_them():
    table = request_table(_record())
    s = summarize(table, 8.0, ttft_slo=None, tpot_slo=1.0)  # request 0 (TPOT 1.5) misses; 1 has no TPOT; 4 meets
    assert s["goodput_req_s"] == pytest.approx(2 / 8)
    s = summarize(table, 8.0, ttft_slo=None, tpot_slo=None, e2e_slo=3.0)  # only request 1 (E2E 2) meets it
    assert s["goodput_req_s"] == pytest.approx(1 / 8)
    assert (s["slo_e2e_s"], math.isnan(s["slo_ttft_s"]), math.isnan(s["slo_tpot_s"])) == (3.0, True, True)
    s = summarize(table, 8.0, ttft_slo=1.5, tpot_slo=2.0, e2e_slo=4.0)
    assert (s["slo_ttft_s"], s["slo_tpot_s"], s["slo_e2e_s"]) == (1.5, 2.0, 4.0)


def test_throughput_over_a_window_shorter_than_a_second_and_none_over_an_empty_window():
    table = request_table(_record())
    assert summarize(table, 0.5, None, None)["output_tok_s"] == pytest.approx(10 / 0.5)
    s = summarize(table, 0.0, None, None)
    assert math.isnan(s["output_tok_s"]) and math.isnan(s["requests_s"]) and math.isnan(s["goodput_req_s"])


def test_a_run_in_which_no_sample_got_a_token_has_undefined_times():
    record = RunRecord(start=START, end=START + 1.0, kv=KVLog(), max_in_flight=1,
                       samples=[SampleRecord("x", 0, 5, START + 0.5, finish_reason="error", error="no memory")])
    row = request_table(record).iloc[0]
    for column in ("first_scheduled_s", "first_token_s", "finish_s", "ttft_s", "tpot_s", "e2e_s", "queue_s"):
        assert isinstance(row[column], float) and math.isnan(row[column]), column
