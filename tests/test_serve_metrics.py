"""The server's Prometheus metrics: step histograms read as prometheus_client's, and one step's observations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engines.request import FinishReason, Request, RequestOutput, SamplingParams
from harness.serve.engine_loop import StepInfo
from harness.serve.metrics import ITL_BUCKETS, ServerMetrics, StepHistogram


def _samples(text: str, family: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples if not s.name.endswith("_created")}


class _One:
    """A registry holding one StepHistogram, as the server's collector exposes it."""

    def __init__(self, histogram: StepHistogram) -> None:
        self.histogram = histogram

    def describe(self):
        return []

    def collect(self):
        yield self.histogram.family(["model_name"], ["m"])


values = st.floats(min_value=0.0, max_value=50.0, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(steps=st.lists(st.lists(values, max_size=20), max_size=6),
       # values on a bucket's bound itself go to that bucket (le: "less than or equal")
       bounds=st.lists(st.sampled_from(ITL_BUCKETS), max_size=5))
def test_step_histogram_reads_as_prometheus_histogram(steps, bounds):
    steps = [*steps, bounds]
    reference_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "doc", ["model_name"], buckets=ITL_BUCKETS, registry=reference_registry).labels("m")
    ours = StepHistogram("h", "doc", ITL_BUCKETS)
    ours_registry.register(_One(ours))
    for step in steps:
        for v in step:
            reference.observe(v)
        ours.observe(step)
    expected = _samples(generate_latest(reference_registry).decode(), "h")
    got = _samples(generate_latest(ours_registry).decode(), "h")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), key


def _out(rid: str, t: float, finished: bool = False, scheduled: float | None = None) -> RequestOutput:
    return RequestOutput(rid, 0, [5], [t], finished=finished, finish_reason=FinishReason.LENGTH if finished else None,
                         num_prompt_tokens=4, first_scheduled_time=scheduled)


def test_a_requests_tokens_make_ttft_gaps_and_its_end():
    """Two requests over three steps: first tokens count as TTFT, later ones as gaps (in both gap histograms),
    and a finished sample adds its end-to-end latency, length, TPOT and success."""
    metrics = ServerMetrics("m", "paged", 16)
    params = SamplingParams(max_tokens=3)
    requests = {rid: Request(rid, [1, 2, 3, 4], params, arrival_time=10.0) for rid in ("a", "b")}
    steps = [
        {"a": [_out("a", 10.5, scheduled=10.25)], "b": [_out("b", 10.5, scheduled=10.25)]},
        {"a": [_out("a", 11.0)], "b": [_out("b", 11.25)]},
        {"a": [_out("a", 12.0, finished=True)]},
    ]
    for grouped in steps:
        metrics.on_step(StepInfo(len(grouped), len(grouped), 0.001), grouped, requests)
    text = metrics.render().decode()

    def value(family: str, name: str, **labels) -> float:
        return _samples(text, family)[(name, tuple(sorted({"model_name": "m", **labels}.items())))]

    ttft = "vllm:time_to_first_token_seconds"
    assert value(ttft, ttft + "_count") == 2 and value(ttft, ttft + "_sum") == 1.0
    assert value(ttft, ttft + "_bucket", le="0.5") == 2  # on the bound
    assert value(ttft, ttft + "_bucket", le="0.25") == 0
    for gaps in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(gaps, gaps + "_count") == 3 and value(gaps, gaps + "_sum") == 0.5 + 0.75 + 1.0
    assert value("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum") == 2.0
    assert value("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 3
    assert value("vllm:request_time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds_sum") == 0.75
    assert value("vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_sum") == 0.5
    assert value("vllm:prompt_tokens", "vllm:prompt_tokens_total") == 8
    assert value("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert value("kvbench:batch_size", "kvbench:batch_size_count") == 3
    assert metrics._samples.keys() == {("b", 0)}  # the finished sample is forgotten
