"""Load behaviour: disconnects free KV memory at once, many streams are batched, SIGTERM shuts down cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.config import PagedConfig
from harness.serve.config import ServerConfig


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if "le" not in s.labels}


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(PagedConfig(num_kv_slots=32768, max_model_len=4096), ServerConfig())


def test_stream_disconnect_aborts_and_frees_kv(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        body = {"prompt": list(range(10, 200)), "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: "):
                    seen += 1
                if seen == 5:
                    break
            m = metrics(c)
            assert m["vllm:kv_cache_usage_perc"] > 0 and m["vllm:num_requests_running"] == 1
            generated_before = m["vllm:generation_tokens_total"]
        # the response is closed: the connection goes away mid-stream
        freed = wait_for(lambda: metrics(c)["vllm:kv_cache_usage_perc"] == 0, timeout=10)
        m = metrics(c)
        assert freed, m
        assert m["vllm:num_requests_running"] == 0 and m["kvbench:kv_allocated_tokens"] == 0
        assert m['vllm:request_success_total'] >= 1
        time.sleep(0.3)
        assert metrics(c)["vllm:generation_tokens_total"] < generated_before + 200  # it stopped, far from 3000


def test_non_streamed_disconnect_aborts_too(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        def running():
            return metrics(c)["vllm:num_requests_running"] >= 1

        def client():
            try:
                httpx.post(server.base_url + "/v1/completions", timeout=1.5,
                           json={"prompt": list(range(10, 100)), "max_tokens": 3000, "ignore_eos": True})
            except httpx.TimeoutException:
                pass  # the client gives up and closes the connection

        t = threading.Thread(target=client)
        t.start()
        assert wait_for(running, timeout=10)
        t.join()
        assert wait_for(lambda: metrics(c)["vllm:kv_cache_usage_perc"] == 0, timeout=10), metrics(c)
        assert metrics(c)["vllm:num_requests_running"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_right_after_sending_aborts_its_request(server, stream):
    """The connection closes as soon as the request is written: nothing may keep generating for it."""
    body = json.dumps({"prompt": list(range(10, 60)), "max_tokens": 3000, "ignore_eos": True, "stream": stream}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
        assert wait_for(lambda: metrics(c)["vllm:generation_tokens_total"] > 0, timeout=10)
        assert wait_for(lambda: metrics(c)["vllm:num_requests_running"] == 0 and
                        metrics(c)["vllm:kv_cache_usage_perc"] == 0, timeout=10), metrics(c)
        text = c.get("/metrics").text
        assert 'vllm:request_success_total{finished_reason="abort",model_name="tiny-qwen3"}' in text


def test_200_concurrent_streams_complete_and_are_batched(server):
    n = 200

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, int]:
        body = {"prompt": [10 + i % 50, 20, 30 + i % 7, 40, 50, 60], "max_tokens": 8, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.5, "seed": i}
        finish, tokens = None, 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for ch in chunk["choices"]:
                    finish = ch["finish_reason"] or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            assert done
        return i, finish, tokens

    async def run():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        before = metrics(c)
        results = asyncio.run(run())
        after = metrics(c)
    assert len(results) == n
    assert all(finish == "length" and tokens == 8 for _, finish, tokens in results), results[:5]
    assert after["kvbench:max_batch_size"] > 1
    # steps that advanced more than one sequence: the histogram's mean batch size over this test is well above 1
    steps = after["kvbench:batch_size_count"] - before["kvbench:batch_size_count"]
    seqs = after["kvbench:batch_size_sum"] - before["kvbench:batch_size_sum"]
    assert seqs == n * 8
    assert seqs / steps > 4, (seqs, steps)
    assert after["vllm:kv_cache_usage_perc"] == 0


# -- SIGTERM: a real `harness serve` process ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "harness", "serve", "--model", "tiny-qwen3", "--port", str(port),
           "--num-kv-slots", "16384", "--max-model-len", "1024", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not come up")


def stream_all(base: str, n: int, max_tokens: int, results: list, started: threading.Event) -> None:
    async def one(client, i):
        body = {"prompt": [10 + i, 20, 30, 40], "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        tokens, done, finish = 0, False, None
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            finish = "error"
                            continue
                        tokens = chunk["usage"]["completion_tokens"]  # a chunk may carry several tokens
                        started.set()
                        if chunk["choices"]:
                            finish = chunk["choices"][0]["finish_reason"] or finish
        except httpx.HTTPError as e:
            return tokens, done, f"{type(e).__name__}"
        return tokens, done, finish

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            results.extend(await asyncio.gather(*(one(client, i) for i in range(n))))

    asyncio.run(run())


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_cleanly():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_process(port)
    try:
        wait_healthy(proc, base)
        results: list = []
        started = threading.Event()
        t = threading.Thread(target=stream_all, args=(base, 16, 60, results, started))
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        code = proc.wait(60)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "KV capacity 16384 token slots" in log
    assert "shut down cleanly on signal SIGTERM" in log
    assert len(results) == 16
    assert all(done and tokens == 60 and finish == "length" for tokens, done, finish in results), results


def test_sigterm_aborts_what_cannot_finish_in_the_grace_period():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_process(port, "--shutdown-timeout", "1")
    try:
        wait_healthy(proc, base)
        results: list = []
        started = threading.Event()
        t = threading.Thread(target=stream_all, args=(base, 4, 1000, results, started))
        t.start()
        assert started.wait(60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        elapsed = time.monotonic() - t0
        t.join(60)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log
    assert elapsed < 20, elapsed
    assert "Traceback" not in log, log
    # every stream got its last chunk (finish_reason "abort") and [DONE]: no connection was cut
    assert len(results) == 4 and all(done and finish == "abort" and tokens < 1000 for tokens, done, finish in results), results
    assert "aborting the requests still running" in log
