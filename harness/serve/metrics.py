"""``GET /metrics``: Prometheus text with the figures vLLM users scrape, under vLLM's names.

Gauges of state (requests running and waiting, KV usage, prefix-cache and preemption
counters kept by the engine) are read from the engine loop's latest snapshot at scrape
time; latencies and token counts are recorded on the engine thread as outputs come out,
on the same ``perf_counter`` clock as the engine's token times, from the moment the server
received the request. Everything lives in a registry of its own (several servers may share
a process, as the tests do).

KV usage is ``allocated / capacity`` as a fraction in [0, 1] (vLLM's ``*_usage_perc`` are
fractions too). ``kvbench:*`` series add what vLLM does not export: the KV memory in token
slots and the batch size of every engine step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from engines.request import FinishReason, Request, RequestOutput
from harness.serve.engine_loop import EngineLoop, LoopObserver, StepInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class _Sample:
    first: float | None = None
    last: float | None = None
    tokens: int = 0


class StepHistogram:
    """A Prometheus histogram (one label set) observed a step at a time: one numpy pass over a step's values instead
    of a locked ``observe`` per token, which cost the API process more per token than anything but the streams.
    Its buckets, sum and count read as ``prometheus_client.Histogram``'s would for the same values."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: list[float]) -> None:
        if not values:
            return
        v = np.asarray(values, dtype=np.float64)
        # a value goes to the first bucket whose upper bound it does not exceed, as Histogram.observe does
        counts = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(v.sum())

    def family(self, labels: list[str], label_values: list[str]) -> HistogramMetricFamily:
        with self._lock:
            cumulative, total = np.cumsum(self.counts).tolist(), self.sum
        family = HistogramMetricFamily(self.name, self.documentation, labels=labels)
        family.add_metric(label_values, [*zip(map(floatToGoString, self.bounds), cumulative), ("+Inf", cumulative[-1])],
                          total)
        return family


@dataclass
class _StepValues:
    """A step's observations, gathered per histogram and observed once."""

    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    prompt_len: list[float] = field(default_factory=list)
    gen_len: list[float] = field(default_factory=list)
    finished: dict[str, int] = field(default_factory=dict)  # samples finished, by reason


class ServerMetrics(LoopObserver):
    def __init__(self, model_name: str, engine_name: str, block_size: int | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.engine_name = engine_name
        self.block_size = block_size
        self.loop: EngineLoop | None = None
        self._samples: dict[tuple[str, int], _Sample] = {}
        self._lock = threading.Lock()
        labels = ["model_name"]
        r = self.registry
        self.ttft = StepHistogram("vllm:time_to_first_token_seconds",
                                  "Time to first token (server receipt to first token).", TTFT_BUCKETS)
        self.itl = StepHistogram("vllm:inter_token_latency_seconds", "Gaps between consecutive tokens of a sample.",
                                 ITL_BUCKETS)
        self.tpot_gap = StepHistogram(
            "vllm:time_per_output_token_seconds",
            "Gaps between consecutive tokens (vLLM's older name for the inter-token latency).", ITL_BUCKETS)
        self.tpot = StepHistogram("vllm:request_time_per_output_token_seconds",
                                  "Per sample: (finish - first token) / (output tokens - 1).", ITL_BUCKETS)
        self.e2e = StepHistogram("vllm:e2e_request_latency_seconds", "Receipt to the last token of a sample.",
                                 E2E_BUCKETS)
        self.queue = StepHistogram("vllm:request_queue_time_seconds", "Receipt to first scheduled.", E2E_BUCKETS)
        self.prompt_len = StepHistogram("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.gen_len = StepHistogram("vllm:request_generation_tokens", "Generated tokens per sample.", TOKEN_BUCKETS)
        self.batch = StepHistogram("kvbench:batch_size", "Sequences that advanced in one engine step.", BATCH_BUCKETS)
        self.step_time = StepHistogram("kvbench:engine_step_seconds", "Wall time of one engine step.", ITL_BUCKETS)
        self.histograms = (self.ttft, self.itl, self.tpot_gap, self.tpot, self.e2e, self.queue, self.prompt_len,
                           self.gen_len, self.batch, self.step_time)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.success = Counter("vllm:request_success", "Samples finished, by reason.", labels + ["finished_reason"],
                               registry=r)
        self.rejected = Counter("kvbench:requests_rejected", "Requests refused before reaching the engine, by reason.",
                                labels + ["reason"], registry=r)
        self.steps = Counter("kvbench:engine_steps", "Engine steps run.", labels, registry=r)
        self.http = Counter("kvbench:http_requests", "HTTP requests answered, by route and status.",
                            labels + ["route", "status"], registry=r)
        r.register(_SnapshotCollector(self))

    def attach(self, loop: EngineLoop) -> None:
        self.loop = loop

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def http_request(self, route: str, status: int) -> None:
        self.http.labels(self.model_name, route, str(status)).inc()

    # -- LoopObserver (engine thread) -------------------------------------------------------------
    def on_step(self, info: StepInfo, outputs: dict[str, list[RequestOutput]], requests: dict[str, Request]) -> None:
        m = self.model_name
        self.steps.labels(m).inc()
        self.step_time.observe([info.seconds])
        if info.batch_size:
            self.batch.observe([info.batch_size])
        if info.new_tokens:
            self.generation_tokens.labels(m).inc(info.new_tokens)
        step = _StepValues()
        with self._lock:
            for rid, outs in outputs.items():
                request = requests[rid]
                for out in outs:
                    self._observe(request, out, step)
        self.ttft.observe(step.ttft)
        self.itl.observe(step.gaps)
        self.tpot_gap.observe(step.gaps)
        self.queue.observe(step.queue)
        self.e2e.observe(step.e2e)
        self.tpot.observe(step.tpot)
        self.prompt_len.observe(step.prompt_len)
        self.gen_len.observe(step.gen_len)
        if step.prompt_len:
            self.prompt_tokens.labels(m).inc(sum(step.prompt_len))
        for reason, count in step.finished.items():
            self.success.labels(m, reason).inc(count)

    def _observe(self, request: Request, out: RequestOutput, step: _StepValues) -> None:
        """One output's share of the step's observations (under ``_lock``)."""
        key = (out.request_id, out.index)
        s = self._samples.get(key)
        if s is None:
            s = self._samples[key] = _Sample()
        for t in out.token_times:
            if s.first is None:
                s.first = t
                step.ttft.append(t - request.arrival_time)
                if out.index == 0:
                    step.prompt_len.append(request.num_prompt_tokens)
            else:
                step.gaps.append(t - s.last)
            s.last = t
            s.tokens += 1
        if out.first_scheduled_time is not None and out.index == 0:
            step.queue.append(max(0.0, out.first_scheduled_time - request.arrival_time))
        if out.finished:
            del self._samples[key]
            reason = out.finish_reason.value if out.finish_reason is not None else "unknown"
            step.finished[reason] = step.finished.get(reason, 0) + 1
            if s.last is not None:
                step.e2e.append(s.last - request.arrival_time)
                step.gen_len.append(s.tokens)
                if s.tokens >= 2:
                    step.tpot.append((s.last - s.first) / (s.tokens - 1))

    def on_end(self, request: Request, reason: FinishReason) -> None:
        with self._lock:
            for key in [k for k in self._samples if k[0] == request.request_id]:
                del self._samples[key]
        self.success.labels(self.model_name, reason.value).inc(request.sampling_params.n)


class _SnapshotCollector:
    """What is read at scrape time: the step histograms, and the state in the engine loop's latest KV snapshot."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        loop = m.loop
        labels = [m.model_name]
        for histogram in m.histograms:
            yield histogram.family(["model_name"], labels)

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        alive = loop is not None and loop.alive
        yield gauge("kvbench:engine_alive", "1 while the engine loop runs.", 1.0 if alive else 0.0)
        if loop is None:
            return
        s = loop.snapshot
        usage = s.allocated / s.capacity if s.capacity else 0.0
        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for the engine (queued or preempted).", loop.num_waiting())
        yield gauge("vllm:gpu_cache_usage_perc", "KV cache usage: allocated / capacity, a fraction in [0, 1].", usage)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage: allocated / capacity, a fraction in [0, 1].", usage)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Sequences preempted.", s.num_preemptions)
        info = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration.",
                                 labels=["model_name", "engine", "block_size", "num_gpu_blocks", "capacity_tokens"])
        bs = m.block_size or 1
        info.add_metric([m.model_name, m.engine_name, str(m.block_size or ""), str(s.capacity // bs if m.block_size else ""),
                         str(s.capacity)], 1.0)
        yield info
        yield gauge("kvbench:kv_capacity_tokens", "KV capacity in token slots.", s.capacity)
        yield gauge("kvbench:kv_allocated_tokens", "Token slots owned by live sequences.", s.allocated)
        yield gauge("kvbench:kv_stored_tokens", "Token slots holding a live sequence's K/V (token states).", s.stored)
        yield gauge("kvbench:kv_free_tokens", "Free token slots.", s.free)
        yield gauge("kvbench:kv_cached_tokens", "Free token slots still holding a reusable prefix.", s.cached)
        yield gauge("kvbench:kv_largest_free_extent_tokens", "The largest allocation that could succeed now.",
                    s.largest_free_extent)
        yield gauge("kvbench:kv_external_fragmentation_tokens",
                    "Free token slots in holes too small for the request waiting first (0 for paging or an empty queue).",
                    s.external)
        yield gauge("kvbench:max_batch_size", "The most sequences that advanced in one engine step so far.", loop.max_batch_size)
        yield gauge("kvbench:last_batch_size", "Sequences that advanced in the last engine step.", loop.last_batch_size)
        yield counter("kvbench:swapped_out", "Sequences swapped out to CPU memory.", s.num_swapped_out)
