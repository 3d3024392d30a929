"""The runner on a scripted engine and a virtual clock: arrivals, closed loops and timestamps exactly."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from engines.base import KVStats
from engines.kv.accounting import KVLog
from engines.request import FinishReason, Request, RequestOutput, SamplingParams
from harness.bench.metrics import request_table
from harness.bench.runner import run_workload
from harness.bench.workload import PlannedRequest


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


class ScriptedEngine:
    """Each step takes 1 s and gives every running request (at most ``batch``) one token."""

    def __init__(self, clock: Clock, batch: int) -> None:
        self.clock, self.batch = clock, batch
        self.waiting: deque[Request] = deque()
        self.running: dict[str, list] = {}  # id -> [request, tokens, first scheduled]
        self.log = KVLog()
        self.num_steps = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        start = self.clock.t
        while self.waiting and len(self.running) < self.batch:
            r = self.waiting.popleft()
            self.running[r.request_id] = [r, 0, start]
        self.log.samples.append((self.num_steps, start, self.kv_stats()))  # after admissions, as our engines do
        self.num_steps += 1
        self.clock.t += 1.0
        outputs = []
        for rid, entry in list(self.running.items()):
            r, done, first = entry
            entry[1] = done + 1
            finished = entry[1] == r.sampling_params.max_tokens
            outputs.append(RequestOutput(rid, 0, [7], [self.clock.t], finished=finished,
                                         finish_reason=FinishReason.LENGTH if finished else None,
                                         first_scheduled_time=first if done == 0 else None))
            if finished:
                del self.running[rid]
        return outputs

    def kv_log(self) -> KVLog:
        log, self.log = self.log, KVLog()
        return log

    def kv_stats(self) -> KVStats:
        stored = sum(len(e[0].prompt_token_ids) + e[1] for e in self.running.values())
        return KVStats(100, stored, stored, 100 - stored, 100 - stored, num_running=len(self.running), num_waiting=len(self.waiting))


def _requests(n: int, tokens: int) -> list[PlannedRequest]:
    return [PlannedRequest(str(i), [1, 2, 3], SamplingParams(max_tokens=tokens, ignore_eos=True)) for i in range(n)]


def test_closed_loop_sends_each_clients_next_request_when_its_last_one_finishes():
    clock = Clock()
    record = run_workload(ScriptedEngine(clock, batch=8), _requests(4, 2), None, concurrency=2,
                          progress=False, clock=clock, sleep=clock.sleep)
    table = request_table(record).sort_values("request_id")
    assert table["arrival_s"].tolist() == [0.0, 0.0, 2.0, 2.0]
    assert table["ttft_s"].tolist() == [1.0] * 4
    assert table["e2e_s"].tolist() == [2.0] * 4
    assert (record.start, record.end, record.max_in_flight) == (0.0, 4.0, 2)
    # sampled after each step's admissions: two running in each of the four steps
    assert [(t, stats.num_running) for _, t, stats in record.kv.samples] == [(0.0, 2), (1.0, 2), (2.0, 2), (3.0, 2)]


def test_open_loop_arrivals_are_scheduled_times_so_queueing_shows():
    clock = Clock()
    record = run_workload(ScriptedEngine(clock, batch=1), _requests(3, 2), np.array([0.0, 0.5, 10.0]),
                          progress=False, clock=clock, sleep=clock.sleep)
    table = request_table(record).sort_values("request_id")
    assert table["arrival_s"].tolist() == [0.0, 0.5, 10.0]
    # request 1 arrives at 0.5 while request 0 holds the only slot until t=2, so it starts at 2
    assert table["queue_s"].tolist() == pytest.approx([0.0, 1.5, 0.0])
    assert table["ttft_s"].tolist() == pytest.approx([1.0, 2.5, 1.0])
    assert table["finish_s"].tolist() == [2.0, 4.0, 12.0]
    assert record.end == 12.0


def test_parallel_samples_finish_a_request_together():
    clock = Clock()

    class TwoSamples(ScriptedEngine):
        def step(self):
            outs = super().step()
            return outs + [RequestOutput(o.request_id, 1, o.new_token_ids, o.token_times, finished=o.finished,
                                         finish_reason=o.finish_reason) for o in outs]

    requests = [PlannedRequest("0", [1], SamplingParams(max_tokens=3, n=2))]
    record = run_workload(TwoSamples(clock, batch=4), requests, None, concurrency=1, progress=False, clock=clock, sleep=clock.sleep)
    table = request_table(record)
    assert sorted(table["sample"]) == [0, 1] and table["output_tokens"].tolist() == [3, 3]


class ScriptedServer:
    """A server's stream: ``tokens`` tokens per request, one every ``gap`` seconds; a request whose id is in
    ``failing`` fails after its first token. Notes when each request was sent."""

    def __init__(self, tokens: int, gap: float, failing: tuple[str, ...] = ()) -> None:
        self.tokens, self.gap, self.failing = tokens, gap, failing
        self.sent: dict[str, float] = {}
        self.open = 0
        self.most_open = 0

    async def stream(self, request: Request):
        import asyncio
        import time

        self.sent[request.request_id] = time.perf_counter()
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            for k in range(self.tokens):
                await asyncio.sleep(self.gap)
                if request.request_id in self.failing and k == 1:
                    yield RequestOutput(request.request_id, 0, [], [], finished=True, finish_reason=FinishReason.ERROR,
                                        error="HTTP 500: boom")
                    return
                yield RequestOutput(request.request_id, 0, [], [time.perf_counter()])
            yield RequestOutput(request.request_id, 0, [], [], finished=True, finish_reason=FinishReason.LENGTH)
        finally:
            self.open -= 1


def _streams(server: ScriptedServer, requests, offsets, concurrency=None):
    import asyncio

    from harness.bench.runner import run_streams

    async def run():  # a driver that loses track of a finished stream hangs: the timeout turns that into a failure
        return await asyncio.wait_for(run_streams(server, requests, offsets, concurrency, progress=False), 10)

    return asyncio.run(run())


def test_streams_in_a_closed_loop_send_each_clients_next_request_at_the_finish_of_its_last():
    server = ScriptedServer(tokens=2, gap=0.02)
    record = _streams(server, _requests(6, 2), None, concurrency=2)
    table = request_table(record).set_index("request_id").sort_index()
    assert table["output_tokens"].tolist() == [2] * 6 and table["error"].isna().all()
    assert record.max_in_flight == server.most_open == 2
    finish = record.start + table["finish_s"]
    for nxt, prev in (("2", "0"), ("3", "1"), ("4", "2"), ("5", "3")):  # the first two clients' turns, in order
        assert record.start + table.loc[nxt, "arrival_s"] == pytest.approx(finish[prev], abs=1e-9)
        assert server.sent[nxt] >= finish[prev]
    assert record.end == pytest.approx(finish.max())


def test_streams_in_an_open_loop_are_sent_when_due_and_failures_are_recorded():
    server = ScriptedServer(tokens=3, gap=0.01, failing=("1",))
    record = _streams(server, _requests(3, 3), np.array([0.0, 0.05, 0.1]))
    table = request_table(record).set_index("request_id").sort_index()
    assert table["arrival_s"].tolist() == pytest.approx([0.0, 0.05, 0.1])
    for rid, due in (("0", 0.0), ("1", 0.05), ("2", 0.1)):
        assert server.sent[rid] - record.start >= due - 1e-3
    assert table.loc["1", "error"] == "HTTP 500: boom" and table.loc["1", "finish_reason"] == "error"
    assert table.loc["1", "output_tokens"] == 1
    assert table.loc[["0", "2"], "output_tokens"].tolist() == [3, 3] and record.kv.samples == []
