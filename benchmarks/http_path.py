"""What the HTTP path costs, without a GPU: ``python -m benchmarks.http_path [options]``.

``harness serve`` + ``harness bench-serve`` deliver fewer tokens per second than the same engine
driven in-process, and the loss is host work (the engine process's loop around ``step()``, the
pipe, the API process's event loop, the streams). To measure that alone, a synthetic engine
stands in for the model: its ``step()`` sleeps a fixed device time (``--device-ms``) and then
makes one token per running sequence (``max_tokens`` honoured, finishing on length), with the
KV log (a sample per step, an allocation per block crossed, a step anatomy per step) that the
real engines hand the server. It is never in the engine list: only this module builds it,
through the ``setup`` callable of ``EngineProcess``.

Each repeat runs, interleaved, the workload offline (``harness.bench.runner.run_workload`` in this
process) and through each server checkout given (``--server-root``; this one by default): a
real uvicorn server on loopback in a process of its own, the engine in its child, and
bench-serve's own client (``harness.bench.http.client.StreamClient`` driven by
``harness.bench.runner.run_streams``, KV log reads included) with ``--concurrency`` closed-loop streams. It prints output tokens/s and TTFT p95 of
each (medians over the repeats), the HTTP/offline ratios, where the engine loop's time outside
``step()`` went (``/kvbench/info``'s ``loop_seconds``, per step), and the CPU seconds per
output token of the API process and of the engine process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, KVStats
from engines.request import FinishReason, Request, RequestError, RequestOutput
from engines.step_clock import StepTimes
from harness.bench.http.config import HTTPConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "synthetic"


@dataclass
class _Sample:
    """One running sample: what the ledger reads of a sequence (engines.kv.accounting.Held), and its budget."""

    seq_id: int
    key: tuple[str, int]
    num_computed: int
    num_prompt_tokens: int
    max_tokens: int
    generated: int = 0


class SyntheticEngine(Engine):
    """The Engine contract with a sleep for the device: every step takes ``device_s`` and advances every running
    sample by one token; a paged-like KV log (``block_size`` slots per block) keeps the server's feed as busy as a
    real engine's. Admission is unlimited: the benchmark's concurrency bounds the batch."""

    name = "synthetic"

    def __init__(self, model_dir: str | Path, device_s: float = 0.0035, block_size: int = 16,
                 capacity: int = 1 << 24, max_model_len: int | None = None) -> None:
        super().__init__(model_dir, max_model_len)
        self.device_s, self.block_size, self.capacity = device_s, block_size, capacity
        self._token_ids = list(range(256, min(self.model_config.vocab_size, 4096)))
        self._waiting: list[Request] = []
        self._running: dict[tuple[str, int], _Sample] = {}
        self._next_seq = 0

    def add_request(self, request: Request) -> None:
        self.check_request(request)
        self._waiting.append(request)

    def _admit(self) -> None:
        for request in self._waiting:
            for index in range(request.sampling_params.n):
                sample = _Sample(self._next_seq, (request.request_id, index), request.num_prompt_tokens,
                                 request.num_prompt_tokens, request.sampling_params.max_tokens)
                self._next_seq += 1
                self._running[sample.key] = sample
                self.ledger.hold(sample, self._blocks(sample.num_computed + 1))
        self._waiting.clear()

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size) * self.block_size

    def _step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        self._admit()
        time.sleep(self.device_s)
        now = time.perf_counter()
        outputs = []
        for sample in list(self._running.values()):
            token = self._token_ids[(sample.seq_id * 31 + sample.generated) % len(self._token_ids)]
            sample.generated += 1
            sample.num_computed += 1
            self.ledger.computed(1)
            finished = sample.generated >= sample.max_tokens
            if finished:
                self.ledger.hold(sample, 0)
                del self._running[sample.key]
            elif sample.num_computed % self.block_size == 0:
                self.ledger.hold(sample, self._blocks(sample.num_computed + 1))
            outputs.append(RequestOutput(
                sample.key[0], sample.key[1], [token], [now], finished=finished,
                finish_reason=FinishReason.LENGTH if finished else None, num_prompt_tokens=sample.num_prompt_tokens,
                first_scheduled_time=start if sample.generated == 1 else None))
        wall = time.perf_counter() - start
        self.ledger.timed([StepTimes(self.ledger.step, wall, 0.0, 0.0, 0.0, 0.0, self.device_s, wall - self.device_s,
                                     self.device_s)])
        return outputs

    def abort(self, request_id: str) -> None:
        self._waiting = [r for r in self._waiting if r.request_id != request_id]
        for key in [k for k in self._running if k[0] == request_id]:
            sample = self._running.pop(key)
            self.ledger.hold(sample, 0)
            self.report_aborted(request_id, key[1], sample.num_prompt_tokens)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    def kv_stats(self) -> KVStats:
        allocated = self.ledger.owned
        free = self.capacity - allocated
        if free < 0:
            raise RequestError("the synthetic engine's KV capacity is exhausted")
        return KVStats(self.capacity, self.ledger.stored, allocated, free, free, num_running=len(self._running),
                       num_waiting=len(self._waiting))


def model_dir(preset: str) -> Path:
    """A preset's directory without weights: the synthetic engine reads only its config and tokenizer."""
    from harness.models.make_model import ensure_model

    return ensure_model(preset, weights=False)


def synthetic_setup(preset: str, device_s: float) -> tuple[Engine, dict[str, Any]]:
    """``EngineProcess``'s setup: runs in the engine process."""
    directory = model_dir(preset)
    return SyntheticEngine(directory, device_s), {"model_dir": str(directory)}


# -- the API process (``python -m benchmarks.http_path serve``) ---------------------------------------
def serve(port: int, preset: str, device_s: float, api_server_count: int = 1) -> None:
    """The server as ``harness serve`` runs it (an engine process, uvicorn; several API processes sharing it when
    ``api_server_count`` > 1), over the synthetic engine."""
    from harness.serve.api_servers import serve_shared
    from harness.serve.config import ServerConfig
    from harness.serve.engine_process import EngineProcess
    from harness.serve.lifecycle import make_server

    cfg = ServerConfig(port=port, warmup=False, log_level="warning", api_server_count=api_server_count,
                       shutdown_timeout_s=1.0)
    setup = functools.partial(synthetic_setup, preset, device_s)
    if api_server_count > 1:
        serve_shared(setup, functools.partial(synthetic_app, preset, cfg), cfg)
        return
    loop = EngineProcess(setup)
    loop.start()
    app = synthetic_app(preset, cfg, loop, loop.extra)
    make_server(app, cfg.host, port, drain_s=cfg.shutdown_timeout_s, log_level=cfg.log_level).run()


def synthetic_app(preset: str, cfg, loop, facts: dict[str, Any]):
    """The app over the synthetic engine's process."""
    from harness.serve.app import create_app

    return create_app(loop, model_dir=facts["model_dir"], served_names=[MODEL_NAME], cfg=cfg,
                      engine_label=SyntheticEngine.name, extra_info={"model_preset": preset})


# -- the client ---------------------------------------------------------------------------------------
def plan(num_requests: int, prompt_len: int, output_len: int, vocab_size: int):
    """The workload: fixed lengths, distinct prompts, greedy, no EOS."""
    from engines.request import SamplingParams
    from harness.bench.workload import PlannedRequest

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    return [PlannedRequest(f"r{i}", [(7 * i + 13 * j) % (vocab_size - 300) + 300 for j in range(prompt_len)], params)
            for i in range(num_requests)]


def figures(record) -> dict[str, float]:
    """Output tokens/s and TTFT p95 as the harness computes them."""
    from harness.bench.metrics import request_table, summarize

    table = request_table(record)
    row = summarize(table, record.end - record.start, None, None)
    return {"output_tok_s": row["output_tok_s"], "ttft_p95": row["ttft_p95"], "output_tokens": row["output_tokens"],
            "failed": row["failed"]}


def run_offline(args: argparse.Namespace) -> dict[str, float]:
    from harness.bench.runner import run_workload

    engine = SyntheticEngine(model_dir(args.preset), args.device_ms / 1e3)
    requests = plan(args.num_requests, args.prompt_len, args.output_len, engine.model_config.vocab_size)
    return figures(run_workload(engine, requests, None, args.concurrency, progress=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(root: Path, args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """A server of the checkout at ``root`` (its harness and engines; this module) in a process of its own: its URL
    and process id."""
    import httpx

    port = free_port()
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(ROOT)!r}]; import benchmarks.http_path as h; "
            f"h.serve({port}, {args.preset!r}, {args.device_ms / 1e3!r}"
            + (f", api_server_count={args.api_server_count})" if args.api_server_count > 1 else ")"))
    paths = (str(root), str(ROOT), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server of {root} exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server of {root} did not start")
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int, but: int | None = None) -> float:
    """CPU seconds of a process, and of its children but ``but`` when given (the API processes of a server with
    several, not its engine process)."""
    import psutil

    process = psutil.Process(pid)
    processes = [process] + ([c for c in process.children() if c.pid != but] if but is not None else [])
    return sum(t.user + t.system for t in (p.cpu_times() for p in processes))


async def run_http(base: str, api_pid: int, args: argparse.Namespace) -> dict[str, float]:
    """The workload through bench-serve's client, with the server's CPU and its engine loop's split around it."""
    import aiohttp
    import httpx

    from engines.detokenizer import load_tokenizer
    from engines.model.config import ModelConfig
    from harness.bench.http.client import StreamClient
    from harness.bench.http.kv_poller import KVPoller
    from harness.bench.http.server import discover, open_connections
    from harness.bench.runner import run_streams
    from harness.bench.workload import PlannedRequest
    from harness.common.engine import warmup_requests

    async with httpx.AsyncClient(timeout=60) as http, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as streams:
        view = await discover(http, base, MODEL_NAME, {})
        directory = Path(view.info["model_dir"])
        client = StreamClient(streams, view, "completions", load_tokenizer(directory), tag=uuid.uuid4().hex[:8], text=False)
        requests = plan(args.num_requests, args.prompt_len, args.output_len, ModelConfig.from_dir(directory).vocab_size)
        warm = [PlannedRequest(r.request_id, r.prompt_token_ids, r.sampling_params)
                for r in warmup_requests(np.arange(300, 400), 2)]
        await run_streams(client, warm, np.zeros(len(warm)), progress=False)
        if not args.cold_connections:
            await open_connections(streams, view, args.concurrency)  # as bench-serve does before a closed loop
        pids = {"api": api_pid, "engine": view.info["engine_pid"]}
        before = await loop_state(http, base, pids)
        client_cpu = time.process_time()
        async with KVPoller(http, view, args.kv_poll_interval).polling():
            record = await run_streams(client, requests, None, args.concurrency, progress=False)
        client_cpu = time.process_time() - client_cpu
        after = await loop_state(http, base, pids)
    out = figures(record)
    tokens = max(out["output_tokens"], 1)
    steps = max(after["steps"] - before["steps"], 1)
    for who in pids:
        out[f"{who}_cpu_us_per_token"] = 1e6 * (after[who] - before[who]) / tokens
    out["client_cpu_us_per_token"] = 1e6 * client_cpu / tokens
    loop = {k: after["loop"].get(k, 0.0) - before["loop"].get(k, 0.0) for k in after["loop"]}
    if loop:
        outside = loop["wall"] - loop["step"] - loop["idle"]
        out["in_step_share"] = loop["step"] / (loop["wall"] - loop["idle"])  # of the time with work to do
        out["outside_step_us_per_step"] = 1e6 * outside / steps
        for phase in ("outputs", "kv", "pickle", "send", "drain"):
            out[f"{phase}_us_per_step"] = 1e6 * loop[phase] / steps
        out["rest_us_per_step"] = 1e6 * (outside - sum(loop[p] for p in ("outputs", "kv", "pickle", "send", "drain"))) / steps
    return out


async def loop_state(http, base: str, pids: dict[str, int]) -> dict[str, Any]:
    info = (await http.get(base + "/kvbench/info")).json()
    return {"steps": info["num_steps"], "loop": info.get("loop_seconds", {}),
            "api": cpu_seconds(pids["api"], but=pids["engine"]), "engine": cpu_seconds(pids["engine"])}


# -- the comparison -----------------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Every repeat runs offline, then each server in turn (interleaved, so drift lands on all of them)."""
    runs: dict[str, list[dict[str, float]]] = {"offline": []}
    for root in args.server_root:
        runs[str(root)] = []
    for r in range(args.repeats):
        runs["offline"].append(run_offline(args))
        for root in args.server_root:
            with server(root, args) as (base, pid):
                runs[str(root)].append(asyncio.run(run_http(base, pid, args)))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{name}: {rows[-1]['output_tok_s']:.0f} tok/s" for name, rows in runs.items()), file=sys.stderr)
    return runs


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(row[k] for row in rows) for k in rows[0]}


def summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Medians over the repeats, and each server's ratios to offline."""
    offline = medians(runs["offline"])
    out = {"offline": offline}
    for name, rows in runs.items():
        if name == "offline":
            continue
        m = medians(rows)
        m["tok_s_ratio"] = m["output_tok_s"] / offline["output_tok_s"]
        m["ttft_p95_ratio"] = m["ttft_p95"] / offline["ttft_p95"]
        out[name] = m
    return out


def print_table(result: dict[str, dict[str, float]]) -> None:
    keys = sorted({k for row in result.values() for k in row}, key=lambda k: (k not in ORDER, ORDER.index(k) if k in ORDER else k))
    names = list(result)
    width = max(len(k) for k in keys)
    print(" " * width + "".join(f"  {n[-28:]:>28}" for n in names))
    for k in keys:
        print(f"{k:<{width}}" + "".join(f"  {result[n][k]:>28.4g}" if k in result[n] else f"  {'':>28}" for n in names))


ORDER = ["output_tok_s", "tok_s_ratio", "ttft_p95", "ttft_p95_ratio", "failed", "in_step_share",
         "outside_step_us_per_step", "outputs_us_per_step", "kv_us_per_step", "pickle_us_per_step", "send_us_per_step",
         "drain_us_per_step", "rest_us_per_step", "api_cpu_us_per_token", "engine_cpu_us_per_token",
         "client_cpu_us_per_token"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--device-ms", type=float, default=3.5, help="the synthetic engine's time per step")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop streaming clients")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--api-server-count", type=int, default=1,
                   help="API processes of each server (server.api_server_count; a checkout that has them)")
    p.add_argument("--kv-poll-interval", type=float, default=HTTPConfig.kv_poll_interval,
                   help="seconds between the client's reads of the server's KV log (engine.kv_poll_interval)")
    p.add_argument("--preset", default="tiny-qwen3", help="whose config and tokenizer the synthetic engine uses")
    p.add_argument("--server-root", type=Path, action="append",
                   help="a checkout whose server to measure (repeatable, e.g. a baseline copy); default: this one")
    p.add_argument("--cold-connections", action="store_true",
                   help="let the first requests open their connections (bench-serve opens them before a closed loop)")
    p.add_argument("--out", type=Path, help="write every run and the medians here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.server_root = [p.resolve() for p in args.server_root or [ROOT]]
    model_dir(args.preset)  # built once here, so the servers' engine processes find it cached
    runs = measure(args)
    result = summary(runs)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "medians": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
