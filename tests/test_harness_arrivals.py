"""Arrival processes: the configured rate and burstiness within statistical tolerance, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.bench.arrivals import arrival_offsets
from harness.bench.schema import ArrivalSpec
from harness.common.errors import UserError

N = 20_000


def _gaps(spec: ArrivalSpec, seed: int = 0) -> np.ndarray:
    return np.diff(arrival_offsets(spec, N, seed))


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_has_the_rate_and_exponential_gaps(rate):
    gaps = _gaps(ArrivalSpec(process="poisson", rate=rate))
    # The mean of N exponential gaps has relative standard error 1/sqrt(N) < 0.8%: allow 4 sigma.
    assert 1 / gaps.mean() == pytest.approx(rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # coefficient of variation 1


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 4.0])
def test_gamma_has_the_rate_and_the_burstiness(burstiness):
    gaps = _gaps(ArrivalSpec(process="gamma", rate=8.0, burstiness=burstiness))
    assert 1 / gaps.mean() == pytest.approx(8.0, rel=0.05)
    cv2 = gaps.var() / gaps.mean() ** 2
    assert cv2 == pytest.approx(1 / burstiness, rel=0.1)  # shape k: squared CV 1/k


def test_offline_is_all_at_zero_and_closed_has_no_schedule():
    assert not arrival_offsets(ArrivalSpec(), 5, 0).any()
    assert arrival_offsets(ArrivalSpec(process="closed", concurrency=3), 5, 0) is None


def test_trace_replays_times_relative_to_the_first(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 10.5}\n{"timestamp": 10.0}\n\n12\n')
    offsets = arrival_offsets(ArrivalSpec(process="trace", trace=str(trace)), 3, 0)
    assert offsets.tolist() == [0.0, 0.5, 2.0]
    with pytest.raises(UserError, match="has 3 arrivals"):
        arrival_offsets(ArrivalSpec(process="trace", trace=str(trace)), 4, 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rate=st.floats(0.1, 1000), burstiness=st.floats(0.1, 10))
def test_arrivals_are_deterministic_given_a_seed_and_ordered(seed, rate, burstiness):
    spec = ArrivalSpec(process="gamma", rate=rate, burstiness=burstiness)
    a, b = arrival_offsets(spec, 50, seed), arrival_offsets(spec, 50, seed)
    assert np.array_equal(a, b)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"process": "closed", "concurrency": 0}, "concurrency"),
    ({"process": "offline", "concurrency": -1}, "concurrency"),
    ({"process": "poisson"}, "rate"),
    ({"process": "gamma", "rate": 1.0, "burstiness": 0.0}, "burstiness"),
    ({"process": "uniform"}, "process"),
    ({"process": "trace", "trace": "/no/such/file"}, "does not exist"),
])
def test_bad_arrival_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        ArrivalSpec(**kwargs)
