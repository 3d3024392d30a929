"""The engine in its own process (``server.engine_process``, the default of ``harness serve``).

The same API as with the engine on a thread, and the same answers; what crosses the pipe
(KV snapshots, step outputs, early ends) reaches /metrics; a dead engine process fails its
streams in-band and turns /health to 503; a server killed outright takes its engine process
with it. Also the merging of outputs that pile up while a stream is busy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from engines.config import PagedConfig
from engines.request import FinishReason, Request, RequestOutput, SamplingParams
from harness.serve.config import compose_serve_config, resolve
from harness.serve.lifecycle import ServerThread

MAX_LEN = 512
PROMPT = [11, 42, 7, 99, 5, 23, 64, 8]


def sse(lines) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def serve_config(*overrides: str):
    return resolve(compose_serve_config(["model.preset=tiny-qwen3", "engine.num_kv_slots=4096",
                                         f"engine.max_model_len={MAX_LEN}", *overrides]))


def start_process_server(*overrides: str) -> ServerThread:
    from harness.serve.cli import make_app, start_engine

    resolved = serve_config(*overrides)
    assert resolved.server.engine_process  # the default
    loop, model_dir, facts = start_engine(resolved)
    server = ServerThread(make_app(resolved, ["tiny-qwen3"], loop, model_dir, facts)).start()
    server.state = server.server.config.app.state.kvbench
    return server


@pytest.fixture(scope="module")
def proc_server(tiny_model):
    tiny_model("tiny-qwen3")  # built once in this process, so the engine process finds it cached
    server = start_process_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def thread_server(start_server):
    return start_server(PagedConfig(num_kv_slots=4096, max_model_len=MAX_LEN))


def test_the_engine_runs_in_another_process(proc_server):
    info = httpx.get(proc_server.base_url + "/kvbench/info").json()
    assert info["engine_process"] is True
    assert info["engine_pid"] != os.getpid()
    assert psutil.Process(info["engine_pid"]).ppid() == os.getpid()
    assert info["kv_capacity_tokens"] == 4096 and info["max_model_len"] == MAX_LEN
    assert info["hardware"]["device"] == "cpu" and info["model_shape"]["num_layers"] > 0  # from the engine process


def test_same_answers_as_the_engine_on_a_thread(proc_server, thread_server):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    a = httpx.post(proc_server.base_url + "/v1/completions", json=body, timeout=60).json()
    b = httpx.post(thread_server.base_url + "/v1/completions", json=body, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["usage"] == b["usage"]
    seeded = {**body, "temperature": 0.9, "seed": 5, "n": 3}
    a = httpx.post(proc_server.base_url + "/v1/completions", json=seeded, timeout=60).json()
    b = httpx.post(thread_server.base_url + "/v1/completions", json=seeded, timeout=60).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    with httpx.stream("POST", proc_server.base_url + "/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 20
    streamed = "".join(e["choices"][0]["text"] for e in events[:-2])
    whole = httpx.post(proc_server.base_url + "/v1/completions", json=body, timeout=60).json()
    assert streamed == whole["choices"][0]["text"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_a_request_id_in_use_is_refused(proc_server):
    with httpx.Client(base_url=proc_server.base_url, timeout=60) as c:
        body = {"prompt": PROMPT, "max_tokens": MAX_LEN - len(PROMPT), "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "dup"}) as r:
            lines = r.iter_lines()  # held, so the stream stays open
            next(line for line in lines if line.startswith("data: "))
            again = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers={"X-Request-Id": "dup"})
            assert again.status_code == 400 and "already in use" in again.json()["error"]["message"]
        assert wait_for(lambda: metric(c, "vllm:kv_cache_usage_perc") == 0, 10)


def test_disconnect_frees_kv_in_the_engine_process(proc_server):
    with httpx.Client(base_url=proc_server.base_url, timeout=60) as c:
        body = {"prompt": PROMPT, "max_tokens": MAX_LEN - len(PROMPT), "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # held: a dropped iterator would close the stream (a disconnect) at once
            data = (line for line in lines if line.startswith("data: "))
            for _ in range(4):
                next(data)
            assert metric(c, "vllm:kv_cache_usage_perc") > 0
        assert wait_for(lambda: metric(c, "vllm:kv_cache_usage_perc") == 0, 10)
        assert wait_for(lambda: 'finished_reason="abort"' in c.get("/metrics").text, 10)


def test_concurrent_streams_are_batched_across_the_pipe(proc_server):
    """64 long prompts at once: more bytes than a pipe holds, so the adds queue behind a busy child."""
    n = 64

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str | None, int]:
        body = {"prompt": [300 + (7 * i + j) % 600 for j in range(400)], "max_tokens": 12, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        finish, tokens = None, 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            for event in sse([line async for line in r.aiter_lines()])[:-1]:
                if event["choices"]:
                    finish = event["choices"][0]["finish_reason"] or finish
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return finish, tokens

    async def run():
        async with httpx.AsyncClient(base_url=proc_server.base_url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    results = asyncio.run(run())
    assert results == [("length", 12)] * n
    with httpx.Client(base_url=proc_server.base_url, timeout=60) as c:
        assert metric(c, "kvbench:max_batch_size") > 1
        assert metric(c, "vllm:num_requests_running") == 0
        assert c.get("/kvbench/info").json()["max_batch_size"] > 1


def test_a_killed_engine_process_fails_its_streams_and_health(tiny_model):
    tiny_model("tiny-qwen3")
    server = start_process_server()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            pid = c.get("/kvbench/info").json()["engine_pid"]
            body = {"prompt": PROMPT, "max_tokens": MAX_LEN - len(PROMPT), "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                os.kill(pid, signal.SIGKILL)
                rest = sse(lines)  # the stream ends in-band: an error event, then [DONE]
            assert rest[-1] == "[DONE]"
            assert any("error" in e and "engine process exited" in e["error"]["message"] for e in rest[:-1])
            health = c.get("/health")
            assert health.status_code == 503 and "engine process exited" in health.json()["error"]["message"]
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 503 and "retry-after" in r.headers
            assert metric(c, "kvbench:engine_alive") == 0
    finally:
        server.stop()


def test_a_server_killed_outright_takes_its_engine_process_along(tiny_model):
    tiny_model("tiny-qwen3")
    port = free_port()
    cmd = [sys.executable, "-m", "harness", "serve", "--model", "tiny-qwen3", "--port", str(port),
           "--num-kv-slots", "4096", "--max-model-len", str(MAX_LEN)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(base), 120), "the server did not come up"
        pid = httpx.get(base + "/kvbench/info").json()["engine_pid"]
        assert pid != proc.pid and psutil.pid_exists(pid)
        proc.kill()
        proc.wait(30)
        assert wait_for(lambda: not _running(pid), 30), "the engine process outlived its server"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_harness_serve_splits_a_model_over_two_processes_and_takes_them_along(tiny_model):
    """`harness serve --tensor-parallel-size 2`: the engine process (no longer daemonic, so that it may) starts its
    worker, answers as one process does, and a server killed outright leaves neither behind."""
    tiny_model("tiny-qwen3")
    port = free_port()
    cmd = [sys.executable, "-m", "harness", "serve", "--model", "tiny-qwen3", "--port", str(port),
           "--num-kv-slots", "4096", "--max-model-len", str(MAX_LEN), "--tensor-parallel-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(base), 120), "the server did not come up"
        pid = httpx.get(base + "/kvbench/info").json()["engine_pid"]
        workers = [c.pid for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 1, "the engine process did not start one worker"
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        got = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
        assert got["usage"]["completion_tokens"] == 12
        proc.kill()
        proc.wait(30)
        assert wait_for(lambda: not _running(pid) and not any(_running(w) for w in workers), 30), \
            "the engine process or its worker outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_engine_process_stops_cleanly_without_a_server(tiny_model):
    import functools

    from harness.serve.cli import open_engine
    from harness.serve.engine_process import EngineProcess

    tiny_model("tiny-qwen3")
    loop = EngineProcess(functools.partial(open_engine, serve_config()))
    loop.start()
    assert loop.info.capacity == 4096 and loop.extra["model_dir"]
    pid = loop.pid
    t0 = time.monotonic()
    loop.stop(5)
    assert time.monotonic() - t0 < 15 and not _running(pid)
    assert not loop.alive and loop.error is None


def slow_engine(resolved, seconds: float):
    """``open_engine`` with a pause before every step (runs in the engine process)."""
    from harness.serve.cli import open_engine

    engine, extra = open_engine(resolved)
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step
    return engine, extra


def test_a_burst_of_adds_larger_than_the_pipe_waits_for_a_busy_engine(tiny_model):
    """Adds pile up while the engine is mid-step; none fails, none blocks the event loop (uvloop's, as served)."""
    import functools

    import uvloop

    from harness.serve.engine_process import EngineProcess

    tiny_model("tiny-qwen3")
    loop = EngineProcess(functools.partial(slow_engine, serve_config("engine.max_model_len=1024", "engine.num_kv_slots=65536"), 0.1))
    loop.start()
    done: dict[str, int] = {}
    loop.on_outputs = lambda grouped: done.update({rid: len(outs[-1].new_token_ids) for rid, outs in grouped.items()
                                                   if outs[-1].finished})

    async def burst():
        loop.attach(asyncio.get_running_loop())
        ticks = 0

        async def tick():  # the event loop stays responsive while the adds wait
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        prompts = [[300 + (7 * i + j) % 600 for j in range(1000)] for i in range(64)]  # ~190 KB of pickled adds
        t0 = time.monotonic()
        futures = [loop.add(Request(f"r{i}", p, SamplingParams(max_tokens=1, ignore_eos=True)))
                   for i, p in enumerate(prompts)]
        added_in = time.monotonic() - t0
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        while len(done) < 64:
            await asyncio.sleep(0.05)
        ticker.cancel()
        return added_in, ticks

    try:
        added_in, ticks = asyncio.run(burst(), loop_factory=uvloop.new_event_loop) if sys.version_info >= (3, 12) \
            else uvloop.run(burst())
    finally:
        loop.stop(10)
    assert added_in < 0.5 and ticks > 5
    assert sorted(done) == sorted(f"r{i}" for i in range(64))


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- merging outputs that piled up ----------------------------------------------------------------------------
def out(rid: str, index: int, tokens: list[int], text: str, finished: bool = False, **kw) -> RequestOutput:
    return RequestOutput(rid, index, tokens, [float(t) for t in tokens], text=text, finished=finished,
                         finish_reason=FinishReason.LENGTH if finished else None, **kw)


def test_followed_by_joins_two_outputs_of_a_sample():
    a = out("r", 0, [1, 2], "ab", num_cached_tokens=16, first_scheduled_time=0.5, num_prompt_tokens=8)
    b = out("r", 0, [3], "c", finished=True, stop_reason=None, num_prompt_tokens=8)
    m = a.followed_by(b)
    assert (m.new_token_ids, m.token_times, m.text) == ([1, 2, 3], [1.0, 2.0, 3.0], "abc")
    assert m.finished and m.finish_reason == FinishReason.LENGTH
    assert (m.num_cached_tokens, m.first_scheduled_time, m.num_prompt_tokens) == (16, 0.5, 8)


def test_a_stream_that_fell_behind_reads_one_merged_output_per_sample():
    from harness.serve.serving import Generation

    async def run():
        gen = Generation(serving=None, base_id="g", prompts=[[1, 2]], n=2)  # type: ignore[arg-type]
        rid = gen.ids[0]
        for step in ([out(rid, 0, [5], "x"), out(rid, 1, [6], "y")],
                     [out(rid, 0, [7], "z")],
                     [out(rid, 0, [8], "w", finished=True), out(rid, 1, [9], "v", finished=True)]):
            gen.queue.put_nowait((rid, step))
        seen = []
        async for outs in gen.outputs():
            seen.append(outs)
            for o in outs:
                gen.apply(o)
        return seen, gen

    seen, gen = asyncio.run(run())
    assert len(seen) == 1  # three steps were waiting: one read
    merged = {o.index: o for o in seen[0]}
    assert merged[0].new_token_ids == [5, 7, 8] and merged[0].text == "xzw" and merged[0].finished
    assert merged[1].new_token_ids == [6, 9] and merged[1].text == "yv" and merged[1].finished
    assert [c.tokens for c in gen.choices] == [3, 2] and gen.open == 0


def test_a_stream_that_keeps_up_reads_every_step():
    from harness.serve.serving import Generation

    async def run():
        gen = Generation(serving=None, base_id="g", prompts=[[1]], n=1)  # type: ignore[arg-type]
        rid = gen.ids[0]

        async def produce():
            for i in range(3):
                await asyncio.sleep(0.01)
                gen.queue.put_nowait((rid, [out(rid, 0, [i], str(i), finished=i == 2)]))

        task = asyncio.ensure_future(produce())
        seen = []
        async for outs in gen.outputs():
            seen.append([o.new_token_ids for o in outs])
            for o in outs:
                gen.apply(o)
        await task
        return seen

    assert asyncio.run(run()) == [[[0]], [[1]], [[2]]]


@pytest.mark.parametrize("which", ["proc_server", "thread_server"])
def test_the_kv_log_has_every_step_and_allocation_of_a_request(which, request):
    """/kvbench/kv_log: the engine's counters after every step and each allocation change, after a cursor."""
    base = request.getfixturevalue(which).base_url
    with httpx.Client(base_url=base, timeout=60) as c:
        cursors = c.get("/kvbench/kv_log", params={"samples": 2**62, "allocations": 2**62, "times": 2**62}).json()["next"]
        rid = f"kv-log-{which}"
        r = c.post("/v1/completions", headers={"X-Request-Id": rid},
                   json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        reply = c.get("/kvbench/kv_log", params=cursors).json()
        again = c.get("/kvbench/kv_log", params=reply["next"]).json()
    fields = reply["fields"]
    rows = [dict(zip(fields, row)) for row in reply["samples"]]
    assert len(rows) == 12  # a prefill and 11 decodes, sampled once each
    assert [r["step"] for r in rows] == list(range(rows[0]["step"], rows[0]["step"] + 12))
    assert all(r["breakdown"] and r["num_running"] == 1 and r["capacity"] == 4096 for r in rows)
    assert rows[-1]["stored"] - rows[1]["stored"] == 10  # one more token's K/V stored by each decode
    mine = [a for a in reply["allocations"] if a[1].startswith(rid)]
    assert mine[0][3] > 0 and mine[-1][3] == 0  # held, then released
    assert mine[-1][4] == rows[-1]["stored"] + 1  # released holding every token but the last sampled one
    assert reply["missed"] == {"samples": 0, "allocations": 0, "times": 0}
    assert again["samples"] == [] and again["allocations"] == [] and again["next"] == reply["next"]
    times = [dict(zip(reply["time_fields"], row)) for row in reply["times"]]  # each step's anatomy, keyed alike
    assert [t["step"] for t in times] == [r["step"] for r in rows] and all(t["wall"] > 0 for t in times)
    assert reply["now"] >= rows[-1]["time"]
