"""The one thread that owns the engine: requests from every connection are batched here.

Engines are not thread-safe, so only this thread touches one. Other threads talk to it
through an inbox of commands (add, abort) and read the snapshot of KV memory and queue
depths it publishes after every iteration. Each iteration drains the inbox, runs one
``engine.step()`` when there is work, and hands that step's outputs, grouped by request,
to ``on_outputs`` (the server forwards them to the asyncio tasks that wait for them).

If ``step()`` raises, the loop is dead: every open request gets a final ERROR output, new
requests are refused, and ``/health`` answers 503. Stopping aborts whatever is still open.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from engines.base import Engine, KVStats
from engines.request import FinishReason, Request, RequestError, RequestOutput
from harness.serve.kv_feed import KVFeed

log = logging.getLogger(__name__)

OutputsCallback = Callable[[dict[str, list[RequestOutput]]], None]

# Where the loop's wall time goes (cumulative seconds, ``EngineLoop.loop_seconds``): inside ``engine.step()``, grouping
# its outputs, reading the KV snapshot and log, pickling and writing to the pipe (engine process only), applying
# commands, and waiting for work. ``wall`` is the loop's whole life, so what none of them holds is the rest.
LOOP_PHASES = ("wall", "step", "outputs", "kv", "pickle", "send", "drain", "idle")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class EngineDead(Exception):
    """The engine loop stopped (it failed, or the server is shutting down)."""


@dataclass
class OpenRequest:
    """A request the server still waits on, and which of its samples have not finished."""

    request: Request
    open_samples: set[int]

    def final_outputs(self, reason: FinishReason, error: str | None) -> list[RequestOutput]:
        """The last output of every open sample, when the request ends without finishing (abort, failure)."""
        rid = self.request.request_id
        return [RequestOutput(rid, i, [], [], finished=True, finish_reason=reason,
                              num_prompt_tokens=self.request.num_prompt_tokens, error=error)
                for i in sorted(self.open_samples)]


def notify(observer: "LoopObserver | None", method: str, *args) -> None:
    """Call an observer's method; metrics must never stop the engine or the deliveries."""
    if observer is None:
        return
    try:
        getattr(observer, method)(*args)
    except Exception:  # noqa: BLE001
        log.exception("the loop observer failed in %s", method)


@dataclass
class StepInfo:
    """What one engine step did: sequences that advanced, tokens it made, and how long it took."""

    batch_size: int
    new_tokens: int
    seconds: float


class LoopObserver:
    """What the loop reports as it goes (the server's metrics); called on the loop thread, must not raise."""

    def on_step(self, info: StepInfo, outputs: dict[str, list[RequestOutput]], requests: dict[str, Request]) -> None: ...

    def on_end(self, request: Request, reason: FinishReason) -> None:
        """A request left without finishing normally (aborted by its client or the shutdown, or failed)."""


@dataclass
class EngineInfo:
    """What the server needs to know about an engine, whichever process it runs in."""

    name: str
    max_model_len: int
    vocab_size: int
    capacity: int  # KV capacity in token slots
    block_size: int | None  # paged engines only
    device: str
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, engine: Engine) -> "EngineInfo":
        block_size = getattr(getattr(engine, "kv", None), "block_size", None) if engine.name == "paged" else None
        return cls(engine.name, engine.max_model_len, engine.model_config.vocab_size, engine.kv_stats().capacity,
                   block_size, str(getattr(engine, "device", "cpu")), tuple(engine.model_config.eos_token_ids))


class EngineLoop:
    """The engine on a thread of this process (``EngineProcess`` runs this loop in a process of its own).

    ``on_outputs`` and ``observer`` may be set after construction, before ``start()``.
    """

    def __init__(self, engine: Engine, on_outputs: OutputsCallback | None = None, *, max_queue: int = 1024,
                 observer: "LoopObserver | None" = None, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.info = EngineInfo.of(engine)
        self.on_outputs: OutputsCallback = on_outputs or (lambda grouped: None)
        self.observer = observer
        self.max_queue = max_queue
        self.idle_wait_s = idle_wait_s
        self._inbox: deque[tuple[str, object, concurrent.futures.Future | None]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._open: dict[str, OpenRequest] = {}  # touched only by the loop thread
        self._pending_adds = 0
        self.error: str | None = None
        self.snapshot: KVStats = engine.kv_stats()
        self.kv_feed = KVFeed()
        self.num_steps = 0
        self.max_batch_size = 0
        self.last_batch_size = 0
        self.loop_seconds = dict.fromkeys(LOOP_PHASES, 0.0)

    # -- any thread --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None and not self._stopping.is_set()

    def num_waiting(self) -> int:
        """Requests not running yet: in the inbox, or waiting (or swapped out) in the engine."""
        return self._pending_adds + self.snapshot.num_waiting

    def num_running(self) -> int:
        return self.snapshot.num_running

    def start(self) -> None:
        """Start the loop thread (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self.run, name="engine-loop", daemon=True)
        self._thread.start()

    def add(self, request: Request) -> concurrent.futures.Future:
        """Queue a request; the future completes once the engine accepted it (or raises RequestError)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.alive:
                raise EngineDead(self.error or "the engine loop is not running")
            if self.num_waiting() >= self.max_queue:
                raise QueueFull(f"{self.num_waiting()} requests are waiting (server.max_queue is {self.max_queue})")
            self._pending_adds += 1
            self._inbox.append(("add", request, future))
        self._wake.set()
        return future

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id, None))
        self._wake.set()

    def abort_all(self) -> None:
        """Abort every open request; each gets a final ABORT output (its stream ends cleanly)."""
        with self._lock:
            self._inbox.append(("abort_all", None, None))
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what is still open, stop the thread and close the engine."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------------
    def run(self) -> None:
        """The loop itself, on the calling thread, until ``stop()`` (``start()`` runs it on a thread of its own)."""
        try:
            self._name_os_thread()
            self._bind_device()
            started = time.perf_counter()
            seconds = self.loop_seconds
            while not self._stopping.is_set():
                self._wake.clear()  # before draining, so a command queued from now on wakes the wait below
                t0 = time.perf_counter()
                self._drain_inbox()
                seconds["drain"] += time.perf_counter() - t0
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._publish()
                    t0 = time.perf_counter()
                    self._idle()
                    seconds["idle"] += time.perf_counter() - t0
                seconds["wall"] = time.perf_counter() - started
            self._drain_inbox()
        except BaseException as e:  # the engine failed: fail everything open, refuse the rest
            self.error = f"engine loop died: {type(e).__name__}: {e}"
            log.exception("engine loop died")
            self._fail_all(self.error)
            self._refuse_inbox(self.error)
            return
        finally:
            if self.error is None:
                self._abort_all()
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001 - closing must not hide the first problem
                log.exception("closing the engine failed")

    def _idle(self) -> None:
        """Nothing to run: wait for a command (or a moment, to publish a fresh snapshot)."""
        self._wake.wait(self.idle_wait_s)

    @staticmethod
    def _name_os_thread() -> None:
        """Name the OS thread "engine-loop", so top -H, py-spy and /proc tell its CPU time from the server's."""
        try:
            import ctypes

            ctypes.CDLL(None).prctl(15, b"engine-loop", 0, 0, 0)  # 15 = PR_SET_NAME (Linux)
        except (OSError, AttributeError):
            pass

    def _bind_device(self) -> None:
        """The current CUDA device is per thread: make this thread's the engine's (CUDA graphs replay on it)."""
        device = getattr(self.engine, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.set_device(device)

    def _drain_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, item, future = self._inbox.popleft()
                if kind == "add":
                    self._pending_adds -= 1
            if kind == "add":
                self._add(item, future)  # type: ignore[arg-type]
            elif kind == "abort":
                self._abort(item)  # type: ignore[arg-type]
            else:
                self._abort_all("aborted: the server is shutting down")

    def _add(self, request: Request, future: concurrent.futures.Future) -> None:
        if self._stopping.is_set():
            future.set_exception(EngineDead("the server is shutting down"))
            return
        if request.request_id in self._open:
            future.set_exception(RequestError(f"request id {request.request_id!r} is already in use"))
            return
        try:
            self.engine.add_request(request)
        except Exception as e:  # noqa: BLE001 - a request the engine refuses (or chokes on) is that request's problem
            if not isinstance(e, RequestError):
                log.exception("the engine failed to add request %s", request.request_id)
            future.set_exception(e)
            return
        self._open[request.request_id] = OpenRequest(request, set(range(request.sampling_params.n)))
        future.set_result(None)

    def _abort(self, request_id: str) -> None:
        entry = self._open.pop(request_id, None)
        if entry is not None:
            self.engine.abort(request_id)
            self._publish()
            self._observe("on_end", entry.request, FinishReason.ABORT)

    def _observe(self, method: str, *args) -> None:
        notify(self.observer, method, *args)

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        stepped = time.perf_counter()
        seconds = stepped - start
        grouped: dict[str, list[RequestOutput]] = {}
        advanced = set()
        new_tokens = 0
        for out in outputs:
            entry = self._open.get(out.request_id)
            if entry is None:  # aborted by its client already
                continue
            if out.new_token_ids:
                advanced.add((out.request_id, out.index))
                new_tokens += len(out.new_token_ids)
            grouped.setdefault(out.request_id, []).append(out)
            if out.finished:
                entry.open_samples.discard(out.index)
        self.num_steps += 1
        self.last_batch_size = len(advanced)
        self.max_batch_size = max(self.max_batch_size, len(advanced))
        requests = {rid: self._open[rid].request for rid in grouped}
        for rid in grouped:
            if not self._open[rid].open_samples:
                del self._open[rid]
        self.loop_seconds["step"] += seconds
        self.loop_seconds["outputs"] += time.perf_counter() - stepped
        self._deliver_step(StepInfo(len(advanced), new_tokens, seconds), grouped, requests)

    def _deliver_step(self, info: StepInfo, grouped: dict[str, list[RequestOutput]], requests: dict[str, Request]) -> None:
        self._publish()
        self._observe("on_step", info, grouped, requests)
        if grouped:
            self.on_outputs(grouped)

    def _publish(self) -> None:
        """The KV snapshot (O(1): the engine's counters) and what the engine logged since the last call."""
        t0 = time.perf_counter()
        self.snapshot = self.engine.kv_stats()
        self.kv_feed.add(self.engine.kv_log())
        self.loop_seconds["kv"] += time.perf_counter() - t0

    def _final(self, reason: FinishReason, error: str | None, rids: list[str] | None = None
               ) -> dict[str, list[RequestOutput]]:
        """End the open requests ``rids`` (default: all): their last outputs, each observed as ended."""
        rids = list(self._open) if rids is None else rids
        grouped = {}
        for rid in rids:
            entry = self._open[rid]
            self._observe("on_end", entry.request, reason)
            grouped[rid] = entry.final_outputs(reason, error)
        for rid in rids:
            del self._open[rid]
        return grouped

    def _fail_all(self, error: str) -> None:
        grouped = self._final(FinishReason.ERROR, error)
        if grouped:
            self.on_outputs(grouped)

    def _abort_all(self, reason: str = "aborted: the server is shutting down") -> None:
        self._abort_open(list(self._open), reason)

    def _abort_open(self, rids: list[str], reason: str) -> None:
        """Abort these open requests; each gets a final ABORT output (its stream ends cleanly)."""
        for rid in rids:
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                log.exception("aborting %s failed", rid)
        grouped = self._final(FinishReason.ABORT, reason, rids)
        self._publish_safely()
        if grouped:
            self.on_outputs(grouped)

    def _publish_safely(self) -> None:
        try:
            self._publish()
        except Exception:  # noqa: BLE001 - a snapshot is best effort once the engine is gone
            log.debug("kv_stats failed while stopping", exc_info=True)

    def _refuse_inbox(self, error: str) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
            self._pending_adds = 0
        for kind, _, future in items:
            if kind == "add" and future is not None and not future.done():
                future.set_exception(EngineDead(error))
