"""Drive an engine in real time with a workload's arrivals and record what happened.

One loop on the ``time.perf_counter`` clock (the clock of ``RequestOutput.token_times``):
send every request that is due, step the engine, stamp the outputs. KV memory is the
engine's own log (``kv_log()``: a sample after each step's admissions), drained before the
run, so warm-up stays out, and after it.
A request's ``arrival_time`` is its *scheduled* time, not the moment the loop got round to
sending it, so time spent blocked in ``step()`` shows up as queue time, as it would for a
client of a real server. In a closed loop a client's next request is scheduled at the
finish of its previous one.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from engines.base import Engine
from engines.kv.accounting import KVLog
from engines.request import Request, RequestOutput
from harness.bench.workload import PlannedRequest


@dataclass
class SampleRecord:
    """One sample (one of a request's n) from arrival to finish; times on the perf_counter clock."""

    request_id: str
    index: int
    prompt_tokens: int
    arrival: float
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish is not None


@dataclass
class RunRecord:
    """Everything measured in one run: the window [start, end], every sample, KV memory each step."""

    start: float
    end: float
    samples: list[SampleRecord]
    kv: KVLog
    max_in_flight: int  # requests sent and not yet finished, at most


class _Run:
    """The state of one run: which requests are due, which samples are open, which clients wait."""

    def __init__(self, engine: Engine, requests: list[PlannedRequest], offsets: np.ndarray | None,
                 concurrency: int | None, clock: Callable[[], float], bar: tqdm) -> None:
        self.engine, self.requests, self.clock, self.bar = engine, requests, clock, bar
        self.index_of = {r.request_id: i for i, r in enumerate(requests)}
        self.start = clock()
        self.due: list[tuple[float, int]] = []  # heap of (arrival time, request index)
        if offsets is None:  # closed loop: the first `concurrency` requests now, the rest as others finish
            self.due = [(self.start, i) for i in range(min(concurrency, len(requests)))]
            self.next_closed = len(self.due)
        else:
            self.due = [(self.start + float(off), i) for i, off in enumerate(offsets)]
            self.next_closed = None
        heapq.heapify(self.due)
        self.samples: dict[tuple[str, int], SampleRecord] = {}
        self.open_samples: dict[str, int] = {}  # request id -> samples not finished yet
        self.max_in_flight = 0
        engine.kv_log()  # what the engine logged before the run (warm-up) is not this run's
        self.kv_baseline = engine.kv_stats()

    def send_due(self) -> None:
        now = self.clock()
        while self.due and self.due[0][0] <= now:
            arrival, i = heapq.heappop(self.due)
            planned = self.requests[i]
            request = Request(planned.request_id, list(planned.prompt_token_ids), planned.sampling_params, arrival_time=arrival)
            for index in range(planned.sampling_params.n):
                self.samples[(planned.request_id, index)] = SampleRecord(
                    planned.request_id, index, len(planned.prompt_token_ids), arrival)
            self.open_samples[planned.request_id] = planned.sampling_params.n
            self.engine.add_request(request)
            self.max_in_flight = max(self.max_in_flight, len(self.open_samples))

    def record(self, out: RequestOutput, received: float) -> None:
        s = self.samples[(out.request_id, out.index)]
        if out.first_scheduled_time is not None and s.first_scheduled is None:
            s.first_scheduled = out.first_scheduled_time
        s.token_times.extend(out.token_times)
        s.cached_tokens = max(s.cached_tokens, out.num_cached_tokens)
        if not out.finished:
            return
        s.finish = s.token_times[-1] if s.token_times else received
        s.finish_reason = out.finish_reason.value if out.finish_reason is not None else None
        s.error = out.error
        self.open_samples[out.request_id] -= 1
        if self.open_samples[out.request_id] == 0:
            del self.open_samples[out.request_id]
            self.bar.update(1)
            if self.next_closed is not None and self.next_closed < len(self.requests):
                n = self.requests[self.index_of[out.request_id]].sampling_params.n
                finish = max(self.samples[(out.request_id, k)].finish for k in range(n))
                heapq.heappush(self.due, (finish, self.next_closed))
                self.next_closed += 1

    def loop(self, sleep: Callable[[float], None]) -> RunRecord:
        while True:
            self.send_due()
            if self.engine.has_unfinished():
                outputs = self.engine.step()
                received = self.clock()
                for out in outputs:
                    self.record(out, received)
            elif self.due:
                sleep(max(0.0, self.due[0][0] - self.clock()))
            else:
                break
        ends = [s.finish for s in self.samples.values() if s.finish is not None]
        kv = self.engine.kv_log()
        kv.baseline = self.kv_baseline
        return RunRecord(self.start, max(ends, default=self.start), list(self.samples.values()), kv, self.max_in_flight)


def run_workload(
    engine: Engine,
    requests: list[PlannedRequest],
    offsets: np.ndarray | None,
    concurrency: int | None = None,
    *,
    desc: str = "run",
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> RunRecord:
    """Send ``requests`` at ``offsets`` seconds after the start (or in a closed loop of ``concurrency`` clients)."""
    if offsets is None and not concurrency:
        raise ValueError("a closed loop needs a concurrency")
    with tqdm(total=len(requests), desc=desc, unit="req", leave=False, disable=not progress) as bar:
        return _Run(engine, requests, offsets, concurrency, clock, bar).loop(sleep)
