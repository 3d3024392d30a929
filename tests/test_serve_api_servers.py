"""Several API processes sharing one engine process (``server.api_server_count``, harness.serve.api_servers).

The engine routes each request's outputs to the API process that added it and tells every one
of them the KV state; an abort-all or a Stop from one touches only its own requests; the engine
stops once every API process has said Stop. ``harness serve --api-server-count 2`` answers from
both processes on one port, as one process does, and leaves nothing behind on SIGTERM or when
its launcher is killed outright.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from engines.request import FinishReason, Request, SamplingParams
from harness.serve.engine_process import start_shared
from harness.serve.messages import AbortAll, Added, AddRequest, Ended, KVSnapshot, Outputs, Ready, Step, Stop, Stopped
from harness.serve.pipe import pickled, unbatch
from test_serve_engine_process import _healthy, _running, free_port, wait_for

PROMPT = [11, 42, 7, 99, 5, 23, 64, 8]
MAX_LEN = 512


def _request(rid: str, max_tokens: int) -> Request:
    return Request(rid, PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


class _Side:
    """One link's end, read synchronously: every event, and each request's outputs."""

    def __init__(self, link) -> None:
        self.link = link
        self.events: list = []
        self.tokens: dict[str, int] = {}
        self.finished: dict[str, FinishReason] = {}
        self.closed = False

    def send(self, command) -> None:
        self.link.commands.send_bytes(pickled(command))

    def read(self, timeout: float = 0.5) -> None:
        """Take one message (a batch) if one comes within ``timeout``."""
        if not self.closed and self.link.events.poll(timeout):
            try:
                batch = list(unbatch(self.link.events.recv()))
            except EOFError:  # the engine process closed this link (after Stopped)
                self.closed = True
                return
            for message in batch:
                self.events.append(message)
                packed = message.outputs if isinstance(message, (Step, Outputs)) else []
                for values in packed:
                    rid, new, finished, reason = values[0], values[2], values[5], values[6]
                    self.tokens[rid] = self.tokens.get(rid, 0) + len(new)
                    if finished:
                        self.finished[rid] = reason

    def until(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; events so far: {self.events[-5:]}"
            self.read()

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def shared_engine(tiny_model):
    """A synthetic engine process (1 ms a step) with two links."""
    from benchmarks.http_path import synthetic_setup

    tiny_model("tiny-qwen3")
    process, links = start_shared(functools.partial(synthetic_setup, "tiny-qwen3", 0.001), 2, 120)
    yield process, [_Side(link) for link in links]
    if process.is_alive():
        process.kill()
        process.join(10)


def test_each_link_gets_its_own_outputs_and_everyones_kv_state(shared_engine):
    process, (a, b) = shared_engine
    assert isinstance(a.link.ready, Ready) and a.link.ready.info == b.link.ready.info
    a.send(AddRequest(_request("a1", 20)))
    b.send(AddRequest(_request("b1", 30)))
    a.until(lambda: "a1" in a.finished)
    b.until(lambda: "b1" in b.finished)
    assert a.tokens == {"a1": 20} and b.tokens == {"b1": 30}  # no output of the other's request reached either
    assert [m.request_id for m in a.of(Added)] == ["a1"] and [m.request_id for m in b.of(Added)] == ["b1"]
    a.until(lambda: len(a.of(Step)) >= 30)  # every step reaches both links, with outputs or without
    logged = [m.kv_log for m in (*a.of(Step), *a.of(KVSnapshot)) if m.kv_log is not None]
    assert logged, "no KV log reached link a"
    a.send(Stop())
    b.send(Stop())
    a.until(lambda: a.of(Stopped))
    b.until(lambda: b.of(Stopped))
    process.join(30)
    assert process.exitcode == 0


def test_abort_all_and_stop_from_one_link_leave_the_other_running(shared_engine):
    process, (a, b) = shared_engine
    a.send(AddRequest(_request("a1", 4000)))  # ~5 s at 1 ms a step: still running when aborted
    b.send(AddRequest(_request("b1", 1000)))
    a.until(lambda: a.tokens.get("a1", 0) >= 5)
    b.until(lambda: b.tokens.get("b1", 0) >= 5)
    a.send(AbortAll())
    a.until(lambda: "a1" in a.finished)
    assert a.finished["a1"] == FinishReason.ABORT
    assert [m.request_id for m in a.of(Ended)] == ["a1"]
    a.send(Stop())  # a's API process stops (it hears so at once); b's carries on, and may still add
    a.until(lambda: a.of(Stopped))
    assert process.is_alive()
    b.send(AddRequest(_request("b2", 10)))
    b.until(lambda: "b1" in b.finished and "b2" in b.finished, timeout=60)
    assert b.finished == {"b1": FinishReason.LENGTH, "b2": FinishReason.LENGTH}
    assert b.tokens == {"b1": 1000, "b2": 10} and "b1" not in a.tokens
    b.send(Stop())
    b.until(lambda: b.of(Stopped))
    process.join(30)
    assert process.exitcode == 0


def test_an_api_process_that_goes_away_frees_its_requests(shared_engine):
    """A link whose pipes close (its API process died) is closed: its requests are aborted, the other link
    serves on, and the engine stops once the other link has said Stop."""
    process, (a, b) = shared_engine
    a.send(AddRequest(_request("a1", 4000)))
    a.until(lambda: a.tokens.get("a1", 0) >= 3)
    a.link.commands.close()
    a.link.events.close()
    b.send(AddRequest(_request("b1", 10)))
    b.until(lambda: "b1" in b.finished)
    kv = [m.snapshot for m in b.of(Step) + b.of(KVSnapshot) if m.snapshot is not None][-1]
    assert kv.num_running == 0  # a1 is gone from the engine
    b.send(Stop())
    b.until(lambda: b.of(Stopped))
    process.join(30)
    assert process.exitcode == 0


# -- harness serve --api-server-count 2 --------------------------------------------------------------------
def _spawned(pid: int) -> list[int]:
    """The processes ``pid`` spawned (multiprocessing's resource tracker aside)."""
    return [c.pid for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


@pytest.fixture
def two_api_server(tiny_model):
    tiny_model("tiny-qwen3")
    port = free_port()
    cmd = [sys.executable, "-m", "harness", "serve", "--model", "tiny-qwen3", "--port", str(port),
           "--num-kv-slots", "4096", "--max-model-len", str(MAX_LEN), "--api-server-count", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(base), 120), "the server did not come up"
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _stream(base: str, i: int) -> tuple[str, int]:
    body = {"prompt": PROMPT[: 4 + i % 4], "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage = "", None
    with httpx.Client(timeout=60) as client, client.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                usage = chunk.get("usage") or usage
    return text, usage["completion_tokens"]


def test_two_api_processes_answer_on_one_port_as_one_does(two_api_server):
    proc, base = two_api_server
    infos = [httpx.get(base + "/kvbench/info").json() for _ in range(40)]  # a new connection each
    assert len({i["api_pid"] for i in infos}) == 2, "connections did not reach both API processes"
    assert len({i["engine_pid"] for i in infos}) == 1 and {i["api_server"]["count"] for i in infos} == {2}
    # the same greedy answers streamed concurrently (spread over both processes) as asked one at a time
    bodies = [{"prompt": PROMPT[: 4 + i % 4], "max_tokens": 16, "temperature": 0, "ignore_eos": True} for i in range(4)]
    alone = [httpx.post(base + "/v1/completions", timeout=60, json=b).json()["choices"][0]["text"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(functools.partial(_stream, base), range(16)))
    assert [t for t, _ in answers] == [alone[i % 4] for i in range(16)]
    assert all(n == 16 for _, n in answers)
    # SIGTERM to the launcher: every process exits, cleanly
    family = _spawned(proc.pid)
    assert len(family) == 3  # the engine process and two API processes
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert wait_for(lambda: not any(_running(p) for p in family), 30), "a process outlived the server"


def test_a_launcher_killed_outright_takes_its_processes_along(two_api_server):
    proc, base = two_api_server
    family = _spawned(proc.pid)
    assert len(family) == 3
    proc.kill()
    proc.wait(30)
    assert wait_for(lambda: not any(_running(p) for p in family), 60), "a process outlived its launcher"
