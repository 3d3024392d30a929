"""Send a workload's requests in real time and record what happened: one bookkeeping, two drivers.

``_Run`` holds a run's state on the ``time.perf_counter`` clock (the clock of
``RequestOutput.token_times``): which requests are due, every sample's record, and in a
closed loop which client sends next (a client's next request is scheduled at the finish of
its previous one). Two drivers feed it ``RequestOutput``s:

- ``run_workload``: an engine of ours in this process. One loop sends every request that is
  due, steps the engine, records the outputs. KV memory is the engine's own log (``kv_log()``:
  a sample after each step's admissions), drained before the run, so warm-up stays out.
- ``run_streams``: a server over HTTP (harness.bench.http). One asyncio task per request
  streams its outputs, stamped as their chunks arrive; the loop sends each request when due.

A request's ``arrival_time`` is its *scheduled* time, not the moment the driver got round to
sending it, so time spent blocked in ``step()`` shows up as queue time, as it would for a
client of a real server.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

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

    def __init__(self, requests: list[PlannedRequest], offsets: np.ndarray | None, concurrency: int | None,
                 start: float, bar: tqdm) -> None:
        if offsets is None and not concurrency:
            raise ValueError("a closed loop needs a concurrency")
        self.requests, self.start, self.bar = requests, start, bar
        self.index_of = {r.request_id: i for i, r in enumerate(requests)}
        if offsets is None:  # closed loop: the first `concurrency` requests now, the rest as others finish
            self.due = [(start, i) for i in range(min(concurrency, len(requests)))]
            self.next_closed: int | None = len(self.due)
        else:
            self.due = [(start + float(off), i) for i, off in enumerate(offsets)]
            self.next_closed = None
        heapq.heapify(self.due)  # (arrival time, request index)
        self.samples: dict[tuple[str, int], SampleRecord] = {}
        self.open_samples: dict[str, int] = {}  # request id -> samples not finished yet
        self.max_in_flight = 0

    def next_due(self) -> float | None:
        return self.due[0][0] if self.due else None

    def pop_due(self, now: float) -> list[Request]:
        """The requests due by ``now``, each with its scheduled arrival time, its samples now open."""
        out = []
        while self.due and self.due[0][0] <= now:
            arrival, i = heapq.heappop(self.due)
            planned = self.requests[i]
            for index in range(planned.sampling_params.n):
                self.samples[(planned.request_id, index)] = SampleRecord(
                    planned.request_id, index, len(planned.prompt_token_ids), arrival)
            self.open_samples[planned.request_id] = planned.sampling_params.n
            self.max_in_flight = max(self.max_in_flight, len(self.open_samples))
            out.append(Request(planned.request_id, list(planned.prompt_token_ids), planned.sampling_params,
                               arrival_time=arrival))
        return out

    def record(self, out: RequestOutput, received: float) -> None:
        s = self.samples[(out.request_id, out.index)]
        if out.first_scheduled_time is not None and s.first_scheduled is None:
            s.first_scheduled = out.first_scheduled_time
        s.token_times.extend(out.token_times)
        s.cached_tokens = max(s.cached_tokens, out.num_cached_tokens)
        if out.num_prompt_tokens:  # the engine's count (a server that was sent text counted it itself)
            s.prompt_tokens = out.num_prompt_tokens
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

    def result(self, kv: KVLog) -> RunRecord:
        ends = [s.finish for s in self.samples.values() if s.finish is not None]
        return RunRecord(self.start, max(ends, default=self.start), list(self.samples.values()), kv, self.max_in_flight)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", leave=False, disable=not progress)


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
    """Send ``requests`` to an engine at ``offsets`` seconds after the start (or in a closed loop of
    ``concurrency`` clients)."""
    engine.kv_log()  # what the engine logged before the run (warm-up) is not this run's
    baseline = engine.kv_stats()
    with _bar(len(requests), desc, progress) as bar:
        run = _Run(requests, offsets, concurrency, clock(), bar)
        while True:
            for request in run.pop_due(clock()):
                engine.add_request(request)
            if engine.has_unfinished():
                outputs = engine.step()
                received = clock()
                for out in outputs:
                    run.record(out, received)
            elif run.due:
                sleep(max(0.0, run.due[0][0] - clock()))
            else:
                break
    kv = engine.kv_log()
    kv.baseline = baseline
    return run.result(kv)


class StreamingClient(Protocol):
    """A server's side of ``run_streams``: each request's outputs as they arrive, their tokens stamped on arrival,
    the last one finished (an error output if the request failed)."""

    def stream(self, request: Request) -> AsyncIterator[RequestOutput]: ...


async def run_streams(
    client: StreamingClient,
    requests: list[PlannedRequest],
    offsets: np.ndarray | None,
    concurrency: int | None = None,
    *,
    desc: str = "run",
    progress: bool = True,
) -> RunRecord:
    """``run_workload`` for a server: each request streamed by a task of its own, sent when due. KV memory is
    the caller's to add (the record's ``kv`` is empty)."""
    with _bar(len(requests), desc, progress) as bar:
        run = _Run(requests, offsets, concurrency, time.perf_counter(), bar)
        changed = asyncio.Event()  # a request finished: a closed loop's next one may be due
        tasks: set[asyncio.Task] = set()  # held, so that the loop does not lose them
        streaming = 0  # requests whose streams have not ended (counted here: a task is done only after its finally)

        async def one(request: Request) -> None:
            nonlocal streaming
            try:
                async for out in client.stream(request):
                    run.record(out, time.perf_counter())
            finally:
                streaming -= 1
                changed.set()

        while True:
            for request in run.pop_due(time.perf_counter()):
                streaming += 1
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            due = run.next_due()
            if due is None and not streaming:
                break
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), None if due is None else max(0.0, due - time.perf_counter()))
            except asyncio.TimeoutError:
                pass
        await asyncio.gather(*tasks)  # each has ended its stream: this only lets them finish
    return run.result(KVLog())
