"""KV memory during a run against a server.

From our server: its KV log (``/kvbench/kv_log``: the engine's counters after every step's
admissions and every change of a sequence's allocation), so the full breakdown of the vLLM
paper is computed as offline, from the same data. From another server: ``/metrics`` is
scraped (vLLM's KV usage and cache_config_info): only the allocated share is known then, and
the breakdown figures are left empty rather than guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator

from harness.bench.http.server import LOG_KEYS, ServerView, json_with

log = logging.getLogger(__name__)


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
            stats = await json_with(self.client, f"{self.view.base_url}/kvbench/kv_stats", self.view.headers, fields)
            known = {f.name for f in dataclasses.fields(KVStats)}
            self.baseline = None if stats is None else KVStats(**{k: v for k, v in stats.items() if k in known})
            await self._read_log(skip=True)
        if self.source == "metrics":
            await self.sample()
            self.baseline = self.scraped[-1][1] if self.scraped else None

    async def _read_log(self, skip: bool = False) -> None:
        cursors = {"samples": 2**62, "allocations": 2**62, "times": 2**62} if skip else self.cursors
        sent = time.perf_counter()
        reply = await json_with(self.client, f"{self.view.base_url}/kvbench/kv_log", self.view.headers, LOG_KEYS,
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

    async def _poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                await self.sample()
        await self.sample()

    @contextlib.asynccontextmanager
    async def polling(self) -> AsyncIterator[None]:
        """Read KV memory every ``interval`` while the block runs (what the server logged before it is not the run's),
        and once more after it."""
        await self.start()
        stop = asyncio.Event()
        task = asyncio.create_task(self._poll(stop))
        try:
            yield
        finally:
            stop.set()
            await task

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
