"""``harness bench-serve``: the benchmark's workloads and arrivals against any OpenAI-compatible server.

``harness bench-serve --base-url http://127.0.0.1:8000 --model NAME [overrides]`` builds the
requests and arrival times exactly as an offline run does (``workload=``, ``arrival=``,
``+experiment=`` and every other override of ``conf/config.yaml``), sends each at its time
as a streamed ``/v1/completions`` request (prompts as token ids, ``ignore_eos`` and
``max_tokens`` as the workload says), and stamps every token when its chunk arrives. The
run is then recorded by the offline harness's own code (harness.bench.runner's records,
harness.bench.metrics, harness.bench.kv_breakdown, harness.bench.results, harness.bench.report), so the tables
have the same columns and the report the same figures as an offline run.

Per token times: a chunk carries usage when the server supports vLLM's
``stream_options.continuous_usage_stats`` (ours and vLLM do), so the number of tokens each
chunk brings is exact; otherwise each chunk with text counts one token. Arrival is the
request's scheduled time (a client blocked by a slow server shows as queueing, as offline);
queue time (first scheduled) is not visible over HTTP and is left empty.

KV memory: from our server, its KV log is read (``/kvbench/kv_log``: the engine's counters
after every step's admissions and every change of a sequence's allocation, so the full
breakdown of the vLLM paper is computed as offline, from the same data); from another
server, ``/metrics`` is scraped (vLLM's KV usage and cache_config_info): only the allocated
share is known then, and the breakdown figures are left empty rather than guessed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("harness.bench.bench_serve")

EXIT_USER_ERROR = 2
EXIT_FAILED = 1


@dataclass
class HTTPEngine:
    """The engine config of a server we know nothing about: where it is and what it serves."""

    name: str = "http"
    base_url: str = ""
    model: str = ""
    max_model_len: int | None = None


@dataclass
class ServerView:
    base_url: str
    model: str
    max_model_len: int | None
    info: dict[str, Any] | None  # /kvbench/info from our server, None from others
    headers: dict[str, str] = field(default_factory=dict)


CLIENT_BUSY = 0.9  # above this share of a core, the client warns that it may be the bottleneck


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness bench-serve",
        description="Run the benchmark's workloads and arrivals against an OpenAI-compatible server over HTTP, "
                    "with the offline harness's metrics, results and report. Extra arguments are Hydra overrides of "
                    "conf/config.yaml (workload=sharegpt_like arrival=poisson arrival.rate=4 +experiment=smoke name=...).")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", help="the served model name (default: the server's first model); a local model directory "
                                   "or preset name here is also used as the tokenizer")
    p.add_argument("--tokenizer", help="model directory whose tokenizer builds the prompts (default: the server's, "
                                       "when it is our server on this machine)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (or set OPENAI_API_KEY)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="completions sends token ids (exact prompt lengths); chat sends the decoded text as one user message")
    p.add_argument("--out", type=Path, help="run directory to write (default outputs/NAME/bench-serve_TIMESTAMP)")
    p.add_argument("--kv-source", choices=["auto", "kvbench", "metrics", "none"], default="auto",
                   help="where KV data comes from: auto = /kvbench/kv_log on our server, else /metrics")
    p.add_argument("--kv-poll-interval", type=float, default=0.02,
                   help="seconds between reads of the KV log (our server: every step is in it) or scrapes of /metrics")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds a request may take (default: no limit)")
    p.add_argument("--no-report", action="store_true", help="write the tables only")
    p.add_argument("--prompt-format", choices=["auto", "text", "token-ids"], default="auto",
                   help="how completions prompts are sent: token ids (exact lengths), or text (for servers that take "
                        "only strings; the lengths are then the server's, from usage); auto: token ids if the server "
                        "takes them")
    p.add_argument("--save-result", action="store_true",
                   help="also write each run as `vllm bench serve --save-result` does (vllm_result.json, vLLM's fields)")
    p.add_argument("--multirun", "-m", action="store_true",
                   help="sweep comma lists (arrival.rate=1,2,4), as `harness -m` does; an experiment with "
                        "hydra.sweeper.params sweeps without it")
    return p


# -- the server ------------------------------------------------------------------------------------
def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def discover(client, base_url: str, model: str | None, headers: dict[str, str]) -> ServerView:
    from harness.common.errors import UserError
    from harness.models.presets import PRESETS

    root = _root(base_url)
    try:
        r = await client.get(f"{root}/v1/models", headers=headers)
    except Exception as e:  # noqa: BLE001 - any transport failure is the user's URL
        raise UserError(f"--base-url: cannot reach {root}/v1/models ({type(e).__name__}: {e})") from e
    if r.status_code == 401:
        raise UserError(f"{root} wants an API key (--api-key or OPENAI_API_KEY)")
    if r.status_code != 200:
        raise UserError(f"{root}/v1/models answered {r.status_code}: {r.text[:200]}")
    cards = r.json().get("data", [])
    names = [c.get("id") for c in cards]
    if not names:
        raise UserError(f"{root} serves no model")
    if model is None or model in names:
        served = model or names[0]
    elif Path(model).is_dir() or model in PRESETS:  # a tokenizer source, named differently by the server
        served = names[0]
        log.warning("--model %s is not a name %s serves (%s); sending %s", model, root, ", ".join(names), served)
    else:
        raise UserError(f"--model: {root} serves {', '.join(names)}, not {model!r}")
    card = next((c for c in cards if c.get("id") == served), {})
    info = await _json_with(client, f"{root}/kvbench/info", headers, INFO_KEYS)
    if info is None:
        log.info("%s has no kvbench endpoints (or they answer something else): KV memory from /metrics", root)
    return ServerView(root, served, card.get("max_model_len") or (info or {}).get("max_model_len"), info, headers)


# What our server's /kvbench replies hold; a server that answers these routes with anything else is not ours.
INFO_KEYS = ("engine", "kv_capacity_tokens", "max_model_len")
LOG_KEYS = ("fields", "samples", "allocations", "next", "missed", "breakdown", "now")


async def _json_with(client, url: str, headers: dict[str, str], keys: tuple[str, ...], **params: Any) -> dict | None:
    """The JSON object at ``url`` if it answers 200 with every one of ``keys``, else None (never an exception:
    a server's stray answer must not cost a run its results)."""
    try:
        r = await client.get(url, headers=headers, params=params or None)
        body = r.json() if r.status_code == 200 else None
    except Exception as e:  # noqa: BLE001 - a transport failure or a body that is not JSON: the same as absent
        log.debug("%s: %s", url, e)
        return None
    return body if isinstance(body, dict) and all(k in body for k in keys) else None


def tokenizer_dir(args: argparse.Namespace, view: ServerView, model_spec, model_overridden: bool) -> Path:
    """Where the prompts' tokenizer comes from: --tokenizer, the server's own directory, --model, or model=..."""
    from harness.common.engine import resolve_model_dir
    from harness.common.errors import UserError
    from harness.common.schema import ModelSpec
    from harness.models.presets import PRESETS

    if args.tokenizer:
        if not Path(args.tokenizer).is_dir():
            raise UserError(f"--tokenizer: {args.tokenizer!r} is not a directory")
        return Path(args.tokenizer)
    info = view.info or {}
    if info.get("model_dir") and Path(info["model_dir"]).is_dir():
        return Path(info["model_dir"])
    if info.get("model_preset") in PRESETS:  # our server on another machine, serving a preset: the same tokenizer
        return resolve_model_dir(ModelSpec(preset=info["model_preset"]))
    if args.model and Path(args.model).is_dir():
        return Path(args.model)
    if args.model in PRESETS:
        return resolve_model_dir(ModelSpec(preset=args.model))
    if model_overridden:
        return resolve_model_dir(model_spec)
    raise UserError("which tokenizer builds the prompts? pass --tokenizer DIR (the served model's directory), "
                    "--model DIR, or model=PRESET")


# -- KV samples ------------------------------------------------------------------------------------
def kv_from_metrics(text: str, model: str):
    """KV state from Prometheus text (vLLM's names): usage, capacity from cache_config_info, queue depths.
    Only the allocated share is known this way: no breakdown."""
    from prometheus_client.parser import text_string_to_metric_families

    from engines.base import KVStats

    values: dict[str, float] = {}
    capacity = 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model_name") not in (None, model) and s.name != "vllm:cache_config_info":
                continue
            if s.name == "vllm:cache_config_info":
                try:
                    capacity = int(float(s.labels.get("num_gpu_blocks") or 0)) * int(float(s.labels.get("block_size") or 0))
                except ValueError:
                    pass
            else:
                values[s.name] = values.get(s.name, 0.0) + s.value
    usage = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc", 0.0))
    allocated = int(round(usage * capacity))
    return KVStats(capacity=capacity, stored=0, allocated=allocated, free=capacity - allocated,
                   largest_free_extent=capacity - allocated, num_running=int(values.get("vllm:num_requests_running", 0)),
                   num_waiting=int(values.get("vllm:num_requests_waiting", 0)),
                   num_preemptions=int(values.get("vllm:num_preemptions_total", 0)),
                   prefix_cache_queries=int(values.get("vllm:prefix_cache_queries_total", 0)),
                   prefix_cache_hits=int(values.get("vllm:prefix_cache_hits_total", 0)), breakdown=False)


class KVPoller:
    """KV memory during a run. From our server: its KV log (``/kvbench/kv_log``), which holds the engine's
    counters after every step and every allocation change, so the breakdown is the offline run's; read every
    ``interval`` seconds and put on this client's clock (the offset measured by the quickest read). From another
    server: ``/metrics`` every ``interval`` (the allocated share only, no breakdown); else nothing."""

    def __init__(self, client, view: ServerView, interval: float, source: str = "auto") -> None:
        self.client, self.view, self.interval = client, view, interval
        self.source = ("kvbench" if view.info is not None else "metrics") if source == "auto" else source
        self.cursors = {"samples": 0, "allocations": 0, "times": 0}
        self.replies: list[dict[str, Any]] = []
        self.offsets: list[tuple[float, float]] = []  # (round trip, server clock - this clock) of each read
        self.scraped: list[tuple[float, Any]] = []  # (time, KVStats) from /metrics
        self.baseline = None

    async def start(self) -> None:
        """Skip what the server logged before the run, and note its counters now (cumulative ones count from here)."""
        from engines.base import KVStats

        if self.source == "kvbench":
            fields = tuple(f.name for f in dataclasses.fields(KVStats) if f.default is dataclasses.MISSING)
            stats = await _json_with(self.client, f"{self.view.base_url}/kvbench/kv_stats", self.view.headers, fields)
            known = {f.name for f in dataclasses.fields(KVStats)}
            self.baseline = None if stats is None else KVStats(**{k: v for k, v in stats.items() if k in known})
            await self._read_log(skip=True)
        if self.source == "metrics":
            await self.sample()
            self.baseline = self.scraped[-1][1] if self.scraped else None

    async def _read_log(self, skip: bool = False) -> None:
        cursors = {"samples": 2**62, "allocations": 2**62, "times": 2**62} if skip else self.cursors
        sent = time.perf_counter()
        reply = await _json_with(self.client, f"{self.view.base_url}/kvbench/kv_log", self.view.headers, LOG_KEYS,
                                 **cursors)
        received = time.perf_counter()
        if reply is None:
            log.warning("%s/kvbench/kv_log gave no KV log: no KV breakdown for this run", self.view.base_url)
            self.source = "none"
            return
        self.cursors = reply["next"]
        self.offsets.append((received - sent, reply["now"] - (sent + received) / 2))
        if any(reply["missed"].values()):
            log.warning("the server's KV log dropped %s entries this client had not read", reply["missed"])
        if not skip:
            self.replies.append(reply)

    async def sample(self) -> None:
        try:
            if self.source == "kvbench":
                await self._read_log()
            elif self.source == "metrics":
                r = await self.client.get(f"{self.view.base_url}/metrics")
                if r.status_code == 200:
                    self.scraped.append((time.perf_counter(), kv_from_metrics(r.text, self.view.model)))
                else:
                    self.source = "none"
        except Exception as e:  # noqa: BLE001 - a missed read is not a failed run (the next read catches up)
            log.debug("KV read failed: %s", e)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                await self.sample()
        await self.sample()

    def kv_log(self, rename: dict[str, str]):
        """Everything read, as one KVLog on this client's clock, with the sequences' ids as the workload's."""
        from engines.kv.accounting import KVLog
        from harness.serve.kv_feed import log_from_reply

        if self.source == "kvbench" and self.offsets:
            offset = min(self.offsets)[1]
            out = KVLog(baseline=self.baseline)
            for reply in self.replies:
                out.extend(log_from_reply(reply, rename, offset))
            return out
        samples = [(i, t, stats) for i, (t, stats) in enumerate(self.scraped)]
        return KVLog(samples, breakdown=False, baseline=self.baseline)


# -- one request -----------------------------------------------------------------------------------
class Client:
    def __init__(self, client, view: ServerView, endpoint: str, tokenizer, tag: str, prompt_format: str = "token-ids") -> None:
        self.client, self.view, self.endpoint, self.tokenizer, self.tag = client, view, endpoint, tokenizer, tag
        self.text = endpoint == "chat" or prompt_format == "text"  # the server counts the prompt: usage says its length

    def body(self, prompt_ids: list[int], params) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.view.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "n": params.n, "ignore_eos": params.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.tokenizer.decode(prompt_ids, skip_special_tokens=False)}]
        elif self.text:
            body["prompt"] = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        else:
            body["prompt"] = list(prompt_ids)
        return body

    def engine_id(self, request_id: str) -> str:
        return f"{self.tag}-{request_id}"

    async def send(self, request_id: str, prompt_ids: list[int], params, samples: list) -> None:
        """Stream one request, stamping each sample's tokens as their chunks arrive."""
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        headers = {**self.view.headers, "X-Request-Id": self.engine_id(request_id)}
        counted = 0  # completion tokens attributed so far (continuous usage)
        saw_usage = False
        try:
            async with self.client.post(self.view.base_url + path, json=self.body(prompt_ids, params),
                                        headers=headers) as r:
                if r.status != 200:
                    text = (await r.read()).decode(errors="replace")
                    self._fail(samples, f"HTTP {r.status}: {_message(text)}")
                    return
                async for raw in r.content:  # one line at a time
                    line = raw.decode(errors="replace")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        self._fail(samples, _message(json.dumps(chunk)), now)
                        continue
                    usage = chunk.get("usage")
                    for choice in chunk.get("choices", []):
                        s = samples[choice.get("index", 0)]
                        text = choice.get("text")
                        if text is None:
                            text = (choice.get("delta") or {}).get("content")
                        if usage is not None:
                            saw_usage = True
                            total = int(usage.get("completion_tokens", 0))
                            k, counted = max(0, total - counted), max(counted, total)
                        else:
                            k = 1 if text else 0
                        s.token_times.extend([now] * k)
                        if choice.get("finish_reason") is not None and s.finish is None:
                            s.finish = s.token_times[-1] if s.token_times else now
                            s.finish_reason = choice["finish_reason"]
                    if usage is not None and not chunk.get("choices"):
                        details = usage.get("prompt_tokens_details") or {}
                        for s in samples:
                            s.cached_tokens = int(details.get("cached_tokens") or 0)
                            if self.text:
                                s.prompt_tokens = int(usage.get("prompt_tokens", s.prompt_tokens))
                        self._settle(samples, usage, saw_usage, now)
        except Exception as e:  # noqa: BLE001 - a transport failure fails this request, not the run
            self._fail(samples, f"{type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        for s in samples:
            if s.finish is None:
                s.finish, s.finish_reason, s.error = now, "error", s.error or "the stream ended without a finish reason"

    @staticmethod
    def _settle(samples: list, usage: dict, saw_continuous: bool, now: float) -> None:
        """Without per-chunk usage, tokens beyond the chunks counted go to the last chunk's time (n = 1 only)."""
        if len(samples) != 1:
            return
        s = samples[0]
        missing = int(usage.get("completion_tokens", 0)) - len(s.token_times)
        if missing > 0:
            s.token_times.extend([s.token_times[-1] if s.token_times else now] * missing)

    @staticmethod
    def _fail(samples: list, message: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        for s in samples:
            if s.finish is None:
                s.finish, s.finish_reason, s.error = now, "error", message


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except Exception:  # noqa: BLE001
        return text[:300]


# -- the run ---------------------------------------------------------------------------------------
async def run_http(client: Client, requests, offsets: np.ndarray | None, concurrency: int | None,
                   poller: KVPoller, progress: bool):
    """Send ``requests`` at ``offsets`` (or in a closed loop of ``concurrency`` clients); the RunRecord."""
    from tqdm.auto import tqdm

    from harness.bench.runner import RunRecord, SampleRecord

    await poller.start()  # what the server logged before now is not this run's (as the offline runner drains it)
    start = time.perf_counter()
    records: dict[tuple[str, int], SampleRecord] = {}
    in_flight = 0
    max_in_flight = 0
    stop = asyncio.Event()
    poll = asyncio.create_task(poller.run(stop))
    bar = tqdm(total=len(requests), desc="bench-serve", unit="req", leave=False, disable=not progress)

    async def one(planned, arrival: float) -> float:
        nonlocal in_flight, max_in_flight
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        samples = [SampleRecord(planned.request_id, i, len(planned.prompt_token_ids), arrival)
                   for i in range(planned.sampling_params.n)]
        for s in samples:
            records[(planned.request_id, s.index)] = s
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await client.send(planned.request_id, list(planned.prompt_token_ids), planned.sampling_params, samples)
        finally:
            in_flight -= 1
            bar.update(1)
        return max(s.finish for s in samples)

    try:
        if offsets is None:
            queue = iter(requests)

            async def worker() -> None:
                arrival = start
                for planned in queue:
                    arrival = await one(planned, arrival)

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        else:
            await asyncio.gather(*(one(r, start + float(off)) for r, off in zip(requests, offsets)))
    finally:
        stop.set()
        await poll
        bar.close()
    rename = {f"{client.engine_id(r.request_id)}-0": r.request_id for r in requests}
    samples = [records[(r.request_id, i)] for r in requests for i in range(r.sampling_params.n) if (r.request_id, i) in records]
    ends = [s.finish for s in samples if s.finish is not None]
    return RunRecord(start, max(ends, default=start), samples, poller.kv_log(rename), max_in_flight)


async def prompt_format(http, view: ServerView, asked: str, token_ids: list[int]) -> str:
    """``asked``, or for ``auto`` what the server takes: one request with a prompt of token ids, answered 200 or not."""
    if asked != "auto":
        return asked
    body = {"model": view.model, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0}
    try:
        r = await http.post(f"{view.base_url}/v1/completions", json=body, headers=view.headers)
        takes_ids = r.status_code == 200
    except Exception as e:  # noqa: BLE001 - the run's own requests will say what is wrong with the server
        log.debug("prompt-format probe: %s", e)
        takes_ids = True
    if not takes_ids:
        log.info("%s does not take token-id prompts (HTTP %d): sending text, lengths from the server's usage",
                 view.base_url, r.status_code)
    return "token-ids" if takes_ids else "text"


async def warm(client: Client, token_ids: np.ndarray, count: int) -> None:
    from engines.request import SamplingParams
    from harness.bench.runner import SampleRecord

    for i in range(count):
        ids = token_ids[np.arange(8) * (i + 1) % len(token_ids)].tolist()
        samples = [SampleRecord(f"warmup-{i}", 0, len(ids), time.perf_counter())]
        await client.send(f"warmup-{i}-{uuid.uuid4().hex[:6]}", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                          samples)
        if samples[0].error:
            log.warning("warm-up request failed: %s", samples[0].error)


async def open_connections(client: Client, count: int) -> None:
    """Open ``count`` keep-alive connections to the server (``count`` requests for /health at once), so that a closed
    loop's first requests find theirs open, as the offline runner's find the engine: otherwise the first wave's TTFT
    holds ``count`` TCP handshakes and the server accepting them one after another (about 90 ms for 64 streams)."""
    url = client.view.base_url + "/health"

    async def one() -> None:
        async with client.client.get(url, headers=client.view.headers) as r:
            await r.read()

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        log.warning("opening %d connections before the run: %d failed (%s)", count, len(failed), failed[0])


def compose_bench_config(overrides: list[str], with_hydra: bool = False):
    """``conf/config.yaml`` with overrides, as the offline app composes it (without the hydra node unless asked)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from harness.bench.app import CONF_DIR
    from harness.bench.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench_serve"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    if not with_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def override_params(overrides: list[str]) -> dict[str, Any]:
    """The overrides as the offline run records them (param.* columns): what a sweep varies."""
    from harness.bench.app import job_params

    return job_params(overrides)


def expand_sweep(overrides: list[str], multirun: bool) -> tuple[list[list[str]], bool]:
    """The jobs to run: one override list each. An experiment's ``hydra.sweeper.params`` and comma lists on the
    command line (``arrival.rate=1,2,4``) sweep as Hydra's basic sweeper does (the command line wins); an engine
    sweep is dropped, since the server's engine is fixed."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_bench_config([o for o in overrides if not _is_sweep(o)], with_hydra=True)
    sweeper = dict(cfg.hydra.sweeper.get("params") or {})
    multirun = multirun or str(cfg.hydra.get("mode")) in ("MULTIRUN", "RunMode.MULTIRUN")
    parser = OverridesParser.create()
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    for key, value in sweeper.items():
        axes[key] = _values(parser.parse_overrides([f"{key}={value}"])[0])
    for text in overrides:
        o = parser.parse_overrides([text])[0]
        key = o.get_key_element()
        if o.is_discrete_sweep() or key in axes:
            axes[key] = _values(o)
        else:
            fixed.append(text)
    if "engine" in axes:
        log.warning("the server's engine is fixed: the engine sweep (%s) is left out", ",".join(axes.pop("engine")))
    if not multirun and any(len(v) > 1 for v in axes.values()):
        multirun = True
    if not axes:
        return [fixed], multirun
    keys = list(axes)
    jobs = [fixed + [f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(axes[k] for k in keys))]
    return jobs, multirun


def _is_sweep(text: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([text])[0].is_sweep_override()
    except Exception:  # noqa: BLE001 - let compose report a malformed override
        return False


def _values(o) -> list[str]:
    return list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]


def engine_of(view: ServerView):
    """The server's engine config (ours tells, so the engine.* columns match an offline run), or HTTPEngine."""
    from engines.config import ENGINE_CONFIGS

    info = view.info or {}
    name, cfg = info.get("engine"), info.get("engine_config")
    if name in ENGINE_CONFIGS and isinstance(cfg, dict):
        try:
            return ENGINE_CONFIGS[name](**cfg), f"{info.get('engine_label') or name}@http"
        except TypeError:
            pass
    return HTTPEngine(base_url=view.base_url, model=view.model, max_model_len=view.max_model_len), f"http:{view.model}"


async def run_job(args: argparse.Namespace, overrides: list[str], out: Path, http, streams, view: ServerView,
                  tok_dir: Path, tokenizer, model_cfg) -> dict[str, Any]:
    """One run of the workload against the server into ``out``; its run row."""
    import torch
    from omegaconf import OmegaConf

    from harness.bench.job import (
        JobSpec,
        _params_row,
        _run_figures,
        plan_requests,
        workload_label,
    )
    from harness.bench.results import write_json, write_run
    from harness.bench.vllm_result import VLLM_RESULT, vllm_result
    from harness.common.engine import regular_token_ids
    from harness.common.system_info import git_state, model_shape, versions

    cfg = compose_bench_config(overrides)
    typed = {name: OmegaConf.to_object(cfg[name]) for name in ("model", "workload", "arrival", "slo")}
    max_len = view.max_model_len or model_cfg.max_context
    seed = cfg.seed + cfg.repeat  # as an offline run: repeat r draws its workload and arrivals from seed + r
    typed["workload"], typed["arrival"], requests, offsets = plan_requests(
        typed["workload"], typed["arrival"], tokenizer, model_cfg.vocab_size, max_len, seed)
    engine, label = engine_of(view)
    spec = JobSpec(name=cfg.name, seed=seed, repeat=cfg.repeat, engine_label=label, engine=engine, **typed,
                   warmup_requests=cfg.warmup_requests, params=override_params(overrides),
                   config=OmegaConf.to_container(cfg, resolve=True))
    client = Client(streams, view, args.endpoint, tokenizer, tag=f"bench-{uuid.uuid4().hex[:8]}",
                    prompt_format=args.prompt_format)
    await warm(client, regular_token_ids(tokenizer, model_cfg.vocab_size), cfg.warmup_requests)
    poller = KVPoller(http, view, args.kv_poll_interval, args.kv_source)
    concurrency = typed["arrival"].concurrency if offsets is None else None
    if concurrency:
        await open_connections(client, min(concurrency, len(requests)))
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    record = await run_http(client, requests, offsets, concurrency, poller, sys.stderr.isatty())
    client_cpu = (time.process_time() - cpu_start) / max(time.perf_counter() - wall_start, 1e-9)
    if client_cpu > CLIENT_BUSY:
        log.warning("this client kept a CPU core %.0f%% busy during the run: it may be what limits the figures "
                    "(TTFT, ITL and tok/s are stamped when it gets to each chunk); fewer streams per client would tell",
                    100 * client_cpu)

    info = view.info or {}
    figures, request_rows, steps = _run_figures(spec, record, model_cfg, torch.device("cpu"))
    wl_label = workload_label(typed["workload"], typed["arrival"])
    server_device = torch.device(str(info["device"]).split(":")[0]) if info.get("device") else torch.device("cpu")
    row = _params_row(spec, tok_dir, server_device, wl_label)
    if not info:
        row["device"] = "unknown"
        row["model"] = view.model
    else:  # as the offline run names it: the preset, or the model directory's name
        row["model"] = info.get("model_preset") or Path(str(info.get("model_dir", view.model))).name
    row["hardware"] = info.get("hardware_label") or f"remote server at {view.base_url} (hardware unknown)"
    metadata = {
        "name": cfg.name, "engine_label": label, "engine": asdict(engine), "model_dir": str(tok_dir),
        "model_shape": info.get("model_shape") or model_shape(model_cfg), "workload_label": wl_label,
        "git": git_state(), "versions": info.get("versions") or versions(), "params": spec.params, "config": spec.config,
        "hardware": info.get("hardware") or {"remote": view.base_url},
        "server": {"base_url": view.base_url, "model": view.model, "endpoint": args.endpoint, "kv_source": poller.source,
                   "prompt_format": "text" if client.text else "token-ids",
                   "info": {k: v for k, v in info.items() if k not in ("hardware", "versions", "model_shape", "config")}},
        "client_versions": versions(),
        "client_cpu_util": client_cpu,  # CPU seconds of this client per second of the run (1.0 = one core busy)
    }
    run = {**row, "status": "ok", **figures}
    if args.save_result:  # before the run's metadata, whose presence marks it finished
        write_json(out / VLLM_RESULT, vllm_result(run, request_rows, model_id=view.model, tokenizer_id=str(tok_dir),
                                                  backend="openai-chat" if args.endpoint == "chat" else "openai"))
    write_run(out, run, {**metadata, "status": "ok"}, request_rows, steps)
    desc = " ".join([label] + [f"{k}={v}" for k, v in spec.params.items()])
    log.info("%s: %.1f output tok/s, p95 TTFT %.3f s, p95 TPOT %.4f s, %d of %d requests failed", desc,
             figures["output_tok_s"], figures["ttft_p95"], figures["tpot_p95"], figures["failed"], figures["num_requests"])
    if figures["failed"]:
        errors = request_rows["error"].dropna()
        if len(errors):
            log.warning("first error: %s", errors.iloc[0])
    return run


async def bench(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    import aiohttp
    import httpx
    from omegaconf import OmegaConf

    from engines.detokenizer import load_tokenizer
    from engines.model.config import ModelConfig
    from harness.bench.report import write_report
    from harness.common.engine import regular_token_ids

    jobs, multirun = expand_sweep(overrides, args.multirun)
    first = compose_bench_config(jobs[0])
    model_spec = OmegaConf.to_object(first.model)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    stamp = f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"
    root = args.out or Path("outputs" if not multirun else "multirun") / first.name / f"bench-serve_{stamp}"
    runs = []
    # the streams go over aiohttp: its C HTTP parser costs a third of httpx's CPU per chunk, and a client that
    # runs out of CPU stamps tokens late (metadata.json's client_cpu_util says how busy it was)
    stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=args.request_timeout)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http, \
            aiohttp.ClientSession(timeout=stream_timeout, connector=aiohttp.TCPConnector(limit=0)) as streams:
        view = await discover(http, args.base_url, args.model, headers)
        model_overridden = any(o.lstrip("+~").startswith("model") for o in overrides)
        tok_dir = tokenizer_dir(args, view, model_spec, model_overridden)
        tokenizer = load_tokenizer(tok_dir)
        model_cfg = ModelConfig.from_dir(tok_dir)
        if args.endpoint == "completions":
            args.prompt_format = await prompt_format(http, view, args.prompt_format,
                                                     regular_token_ids(tokenizer, model_cfg.vocab_size)[:8].tolist())
        for k, job in enumerate(jobs):
            if multirun:
                name = ",".join(o for o in job if o not in overrides) or "run"  # the swept values, as Hydra names jobs
                out = root / f"{k}_{name.replace('/', '_')}"
            else:
                out = root
            runs.append(await run_job(args, job, out, http, streams, view, tok_dir, tokenizer, model_cfg))
    if first.report and not args.no_report:
        path = write_report([root], root)
        print(f"report: {path}", file=sys.stderr)
    print(f"results: {root}", file=sys.stderr)
    return root, runs


def main(argv: list[str] | None = None) -> int:
    from harness.common.errors import USER_ERRORS, describe_error

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        _, runs = asyncio.run(bench(args, overrides))
    except USER_ERRORS as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: finished runs keep their results (summarize them with `harness report DIR`)", file=sys.stderr)
        return 130
    return EXIT_FAILED if any(run.get("completed", 0) == 0 for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
