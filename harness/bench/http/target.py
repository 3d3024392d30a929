"""A server over HTTP as a job's target (harness.bench.target): what harness.bench.job needs, from the server.

The prompts' tokenizer and model shape come from the server's model directory (ours says where
it is) or from engine.tokenizer / engine.model / model=..., so a run plans the same requests as
an offline run of that model. The run's engine is the server's (ours says which; of another
server only the target's settings are known), its hardware and versions are the server's, and
the client's own CPU load is recorded: a client that runs out of CPU stamps tokens late.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.detokenizer import load_tokenizer
from engines.model.config import ModelConfig
from harness.bench.http.client import StreamClient
from harness.bench.http.config import HTTPConfig
from harness.bench.http.kv_poller import KVPoller
from harness.bench.http.server import discover, engine_of, open_connections, takes_token_ids, tokenizer_dir
from harness.bench.runner import RunRecord, run_streams
from harness.bench.workload import PlannedRequest
from harness.common.engine import freeze_heap, regular_token_ids, warmup_requests
from harness.common.system_info import model_shape, versions

log = logging.getLogger(__name__)

CLIENT_BUSY = 0.9  # above this share of a core, the client warns that it may be the bottleneck
API_KEY_ENV = "OPENAI_API_KEY"  # the key is read from the environment, never written into a run's config


class HTTPTarget:
    def __init__(self, spec) -> None:
        self.cfg: HTTPConfig = spec.engine
        self.loop = asyncio.new_event_loop()  # the sessions belong to it: every call of this target runs on it
        api_key = os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http, self.streams = self._call(_sessions(self.cfg.request_timeout))
        try:
            self.view = self._call(discover(self.http, self.cfg.base_url, self.cfg.model, headers))
            overridden = any(k == "model" or k.startswith("model.") for k in spec.params)
            self.model_dir = tokenizer_dir(self.cfg, self.view, spec.model, overridden)
        except BaseException:
            self.close(keep=False)
            raise
        self.model_cfg = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.token_ids = regular_token_ids(self.tokenizer, self.model_cfg.vocab_size)  # what prompts may hold
        self.max_len = self.view.max_model_len or self.model_cfg.max_context
        self.engine, self.engine_label = engine_of(self.view, self.cfg)
        info = self.view.info or {}
        # as an offline run names it: the preset, or the model directory's name
        self.model_name = (info.get("model_preset") or Path(str(info.get("model_dir", self.view.model))).name
                           if info else self.view.model)
        self.device = torch.device(str(info["device"]).split(":")[0]) if info.get("device") else None
        self.client: StreamClient | None = None
        self.client_cpu = math.nan
        self.kv_source = self.cfg.kv_source  # where the last run's KV data came from

    def _call(self, coro):
        return self.loop.run_until_complete(coro)

    def start(self) -> None:
        text = self.cfg.prompt_format == "text"
        if self.cfg.endpoint == "completions" and self.cfg.prompt_format == "auto":
            text = not self._call(takes_token_ids(self.http, self.view, self.token_ids[:8].tolist()))
        self.client = StreamClient(self.streams, self.view, self.cfg.endpoint, self.tokenizer,
                                   tag=f"bench-{uuid.uuid4().hex[:8]}", text=text)

    def warm_up(self, num_requests: int) -> None:
        """The warm-up requests an offline engine gets, all at once; a failure is logged, as the run's would be."""
        planned = [PlannedRequest(r.request_id, r.prompt_token_ids, r.sampling_params)
                   for r in warmup_requests(self.token_ids, num_requests)]
        if not planned:
            return
        record = self._call(run_streams(self.client, planned, np.zeros(len(planned)), progress=False))
        errors = [s.error for s in record.samples if s.error]
        if errors:
            log.warning("warm-up request failed: %s", errors[0])

    def run(self, requests: list[PlannedRequest], offsets: Any, concurrency: int | None, desc: str,
            progress: bool) -> RunRecord:
        return self._call(self._run(requests, offsets, concurrency, desc, progress))

    async def _run(self, requests, offsets, concurrency, desc, progress) -> RunRecord:
        if offsets is None:
            await open_connections(self.streams, self.view, min(concurrency, len(requests)))
        poller = KVPoller(self.http, self.view, self.cfg.kv_poll_interval, self.cfg.kv_source)
        freeze_heap()  # as before an offline run (harness.bench.engine_keeper): no full collection of this heap mid-run
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        async with poller.polling():
            record = await run_streams(self.client, requests, offsets, concurrency, desc=desc, progress=progress)
        self.client_cpu = (time.process_time() - cpu_start) / max(time.perf_counter() - wall_start, 1e-9)
        if self.client_cpu > CLIENT_BUSY:
            log.warning("this client kept a CPU core %.0f%% busy during the run: it may be what limits the figures "
                        "(TTFT, ITL and tok/s are stamped when it gets to each chunk); fewer streams per client "
                        "would tell", 100 * self.client_cpu)
        self.kv_source = poller.source
        record.kv = poller.kv_log({f"{self.client.engine_id(r.request_id)}-0": r.request_id for r in requests})
        return record

    def ceilings(self) -> tuple[float, float] | None:
        return None  # the server's hardware is known by name only: no roofline from here

    def parallelism(self) -> tuple[int, float]:
        return 1, math.inf  # unused: no roofline from here (ceilings)

    def peak_memory(self) -> float:
        return math.nan

    def metadata(self) -> dict[str, Any]:
        info = self.view.info or {}
        out: dict[str, Any] = {
            "hardware": info.get("hardware") or {"remote": self.view.base_url},
            "hardware_label": info.get("hardware_label") or f"remote server at {self.view.base_url} (hardware unknown)",
            "model_shape": info.get("model_shape") or model_shape(self.model_cfg),
            "versions": info.get("versions") or versions(),
            "client_versions": versions(),
            "client_cpu_util": self.client_cpu,  # CPU seconds of this client per second of the run (1 = one core)
            "server": {"base_url": self.view.base_url, "model": self.view.model, "endpoint": self.cfg.endpoint,
                       "kv_source": self.kv_source,
                       "prompt_format": "text" if self.client is not None and self.client.text else "token-ids",
                       "info": {k: v for k, v in info.items() if k not in ("hardware", "versions", "model_shape", "config")}},
        }
        if self.compute_dtype is not None:
            out["compute_dtype"] = self.compute_dtype
        return out

    @property
    def compute_dtype(self) -> str | None:
        return (self.view.info or {}).get("compute_dtype")

    @property
    def served_model(self) -> str:
        return self.view.model

    @property
    def backend(self) -> str:
        return "openai-chat" if self.cfg.endpoint == "chat" else "openai"

    def close(self, keep: bool) -> None:
        async def shut() -> None:
            await self.http.aclose()
            await self.streams.close()

        if not self.loop.is_closed():
            self.loop.run_until_complete(shut())
            self.loop.close()


async def _sessions(timeout: float | None):
    """The target's two HTTP clients, made on its loop (aiohttp binds a session to the loop it is made on): httpx for
    the few plain requests, aiohttp for the streams, whose C HTTP parser costs a third of httpx's CPU per chunk (a
    client that runs out of CPU stamps tokens late; metadata's client_cpu_util says how busy it was)."""
    import aiohttp
    import httpx

    http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
    streams = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=timeout),
                                    connector=aiohttp.TCPConnector(limit=0))
    return http, streams
