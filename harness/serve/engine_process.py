"""The engine loop in a process of its own, so HTTP work and engine work never share one GIL.

With the engine on a thread of the server process (``EngineLoop``), every step's Python
(scheduling, sampling, detokenizing) and every stream's (JSON, server-sent events, sockets)
take turns on one interpreter lock, and under load each slows the other down. vLLM's v1
engine core runs in its own process for the same reason. ``EngineProcess`` does that here:

- the child (harness.serve.engine_worker) builds the engine (model load, KV sizing, warm-up)
  from a picklable ``setup`` callable, then runs the very same ``EngineLoop`` on it, and
  forwards what the loop says (KV snapshots, each step's outputs with its ``StepInfo``,
  requests that ended early) to the parent over a pipe, in order;
- the parent keeps the ``EngineLoop`` interface (``add``, ``abort``, ``abort_all``, ``stop``,
  ``snapshot``, ``alive``, ...), so the app does not know which one it has. Once ``attach``ed
  to the server's event loop, it reads the pipe there, whenever it is readable, and calls
  ``on_outputs`` and the observer; no thread of the server's waits for the interpreter lock
  to read a message (a reader thread did, up to a switch interval per message, and the
  child's sends then blocked on a full pipe, stalling the engine).

What crosses the pipes is one dataclass per message kind (harness.serve.messages), and
neither side waits on the other's reading (harness.serve.pipe). The child writes only when
the pipe has room; what the parent has not read yet waits in its outbox and goes later, with
what came since, as one batch (when idle, it writes everything). The parent writes a command
at once when it fits, and hands it to a writer thread otherwise (and while that one holds
others, to keep their order); a burst of adds then reaches the engine at its next step, instead
of one writer-thread wake-up at a time (each waits for the interpreter lock from the busy
event loop). Every step message carries the child loop's own timings (``loop_seconds``,
harness.serve.engine_loop.LOOP_PHASES); ``/kvbench/info`` shows them.

Several API processes may share one engine process (harness.serve.api_servers): ``start_shared``
starts it with a pair of pipes per API process, and each attaches an ``EngineProcess`` to its
own (``link``); that one never starts or stops the child itself.

If the child dies (a crash, the OOM killer), every open request gets a final ERROR output
and the server answers 503, as when ``step()`` raises. Only the parent stops the child: it
ignores SIGINT and SIGTERM, and exits when the parent is gone (harness.serve.engine_worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engines.base import KVStats
from engines.request import FinishReason, Request, RequestError, RequestOutput
from harness.serve.engine_loop import (
    LOOP_PHASES,
    EngineDead,
    EngineInfo,
    LoopObserver,
    OpenRequest,
    OutputsCallback,
    QueueFull,
    StepInfo,
    notify,
)
from harness.serve.engine_worker import EngineSetup, worker_main
from harness.serve.kv_feed import KVFeed
from harness.serve.messages import (
    AbortAll,
    AbortRequest,
    Added,
    AddRequest,
    Command,
    Dead,
    Ended,
    Event,
    KVSnapshot,
    Outputs,
    Ready,
    StartFailed,
    Step,
    Stop,
    Stopped,
    unpack_outputs,
)
from harness.serve.pipe import HEADER, batch, enlarge, pickled, room, unbatch

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The child could not build the engine; ``user_error`` when the configuration is at fault."""

    def __init__(self, message: str, user_error: bool) -> None:
        super().__init__(message)
        self.user_error = user_error


@dataclass
class EngineLink:
    """An engine process started for several API processes (``start_shared``): one pair of pipes for each, and its
    ``Ready`` answer. Picklable: each API process gets its own and attaches an ``EngineProcess`` to it."""

    commands: Connection  # this end writes commands to the engine
    events: Connection  # this end reads the engine's events
    ready: Ready
    engine_pid: int


def start_shared(setup: EngineSetup, count: int, startup_timeout_s: float = 1800.0
                 ) -> tuple[multiprocessing.process.BaseProcess, list[EngineLink]]:
    """Start one engine process for ``count`` API processes and wait until its engine is ready; raises
    ``EngineStartError`` as ``EngineProcess.start`` does. The caller hands each link to one API process."""
    context = multiprocessing.get_context("spawn")
    pairs = [context.Pipe(duplex=False) for _ in range(2 * count)]
    events, child_events = zip(*pairs[:count])  # child -> parent
    child_commands, commands = zip(*pairs[count:])  # parent -> child
    process = context.Process(target=worker_main, name="kvbench-engine", daemon=False,
                              args=(setup, list(child_commands), list(child_events)))
    process.start()
    for conn in (*child_commands, *child_events):
        conn.close()
    links = []
    for command, event in zip(commands, events):
        links.append(EngineLink(command, event, _ready(process, event, startup_timeout_s), process.pid))
    return process, links


def _ready(process: multiprocessing.process.BaseProcess, events: Connection, timeout_s: float) -> Ready:
    """The engine process's first answer: ``Ready``, or why it could not start (``EngineStartError``)."""
    if not events.poll(timeout_s):
        if process.is_alive():
            process.kill()
            process.join(10)
        raise EngineStartError(f"the engine process did not become ready in {timeout_s:.0f} s", False)
    try:
        message = events.recv()
    except EOFError:
        process.join(5)
        raise EngineStartError(f"the engine process exited while starting (exit code {process.exitcode})",
                               False) from None
    if isinstance(message, StartFailed):
        process.join(30)
        raise EngineStartError(message.message, message.user_error)
    return message


class EngineProcess:
    """The ``EngineLoop`` interface, over an engine loop in a child process (see the module's docstring): one it
    starts itself, from ``setup``, or one started for several API processes (``link``, from ``start_shared``)."""

    def __init__(self, setup: EngineSetup | None = None, on_outputs: OutputsCallback | None = None, *,
                 max_queue: int = 1024, observer: LoopObserver | None = None, startup_timeout_s: float = 1800.0,
                 link: EngineLink | None = None) -> None:
        if (setup is None) == (link is None):
            raise ValueError("an EngineProcess needs a setup to start its engine process, or a link to a shared one")
        self.setup = setup
        self.link = link
        self.on_outputs: OutputsCallback = on_outputs or (lambda grouped: None)
        self.observer = observer
        self.max_queue = max_queue
        self.startup_timeout_s = startup_timeout_s
        self.info: EngineInfo | None = None
        self.extra: dict[str, Any] = {}  # what setup() reported besides the engine (hardware, model directory)
        self.error: str | None = None
        self.snapshot = KVStats(0, 0, 0, 0, 0)
        self.kv_feed = KVFeed()
        self.num_steps = 0
        self.max_batch_size = 0
        self.last_batch_size = 0
        self.loop_seconds = dict.fromkeys(LOOP_PHASES, 0.0)  # the child's, as of its last step message
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        # two one-way pipes: the parent's end of each can block or not on its own (the event loop's poller
        # makes the fd it watches non-blocking), and neither side's writes wait on the other's
        if link is None:
            self._events, self._child_events = self._context.Pipe(duplex=False)  # child -> parent
            self._child_commands, self._commands = self._context.Pipe(duplex=False)  # parent -> child
        else:
            self._events, self._commands = link.events, link.commands
        self._command_capacity = enlarge(self._commands)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # pickled commands, for the writer thread
        self._queued = 0  # commands handed to the writer thread and not yet written (guarded by _send_lock)
        self._send_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._aio: asyncio.AbstractEventLoop | None = None  # the event loop reading the pipe, once attached
        self._stopped = threading.Event()  # the child said it stopped, or it is gone
        self._lock = threading.Lock()  # guards _open and _pending
        self._open: dict[str, OpenRequest] = {}
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child and wait until its engine is ready (once; later calls do nothing). Attached to a shared
        engine process (``link``), that one is ready already."""
        if self._writer is not None:
            return
        if self.link is not None:
            ready = self.link.ready
            self.info, self.extra, self.snapshot = ready.info, dict(ready.extra), ready.snapshot
            self._start_writer()
            return
        # not daemonic: a daemonic process may not start children (a tensor-parallel engine's workers); stop(), or EOF
        # on its command pipe, ends it
        self._process = self._context.Process(target=worker_main, name="kvbench-engine", daemon=False,
                                              args=(self.setup, [self._child_commands], [self._child_events]))
        self._process.start()
        self._child_commands.close()  # the child holds these ends now: EOF then means the other side is gone
        self._child_events.close()
        message = _ready(self._process, self._events, self.startup_timeout_s)
        self.info, self.extra, self.snapshot = message.info, message.extra, message.snapshot
        self._start_writer()

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write, name="engine-process-writer", daemon=True)
        self._writer.start()

    def attach(self, aio: asyncio.AbstractEventLoop) -> None:
        """Read the child's messages on ``aio`` from now on (call on that loop's thread, after ``start``)."""
        self._aio = aio
        aio.add_reader(self._events.fileno(), self._on_readable)
        # uvloop's poller made the fd non-blocking; a message is read whole once its first byte is there
        os.set_blocking(self._events.fileno(), True)

    @property
    def pid(self) -> int | None:
        if self.link is not None:
            return self.link.engine_pid
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return (self._aio is not None and not self._stopped.is_set() and self.error is None
                and not self._stopping.is_set())

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what is still open, stop the child (its engine closes there) and wait for it."""
        self._stopping.set()
        if self._writer is None:
            return
        self._send(Stop())
        self._outbox.put(None)  # the writer's last item
        wait = None if timeout is None else timeout + 10
        if self._aio is not None and self._aio.is_running() and not _on_loop(self._aio):
            self._stopped.wait(wait)  # the event loop reads the child's last messages
        else:
            self._read_until_stopped(wait)
        if self._process is None:  # a shared engine process: it stops once every API process has said Stop
            return
        self._process.join(10)
        if self._process.is_alive():
            log.warning("the engine process did not stop in time; killing it")
            self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    # -- any thread (the EngineLoop interface) --------------------------------------------------------
    def num_waiting(self) -> int:
        return len(self._pending) + self.snapshot.num_waiting

    def num_running(self) -> int:
        return self.snapshot.num_running

    def add(self, request: Request) -> concurrent.futures.Future:
        """Queue a request; the future completes once the engine accepted it (or raises RequestError)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        rid = request.request_id
        with self._lock:
            if not self.alive:
                raise EngineDead(self.error or "the engine loop is not running")
            if self.num_waiting() >= self.max_queue:
                raise QueueFull(f"{self.num_waiting()} requests are waiting (server.max_queue is {self.max_queue})")
            if rid in self._open:
                future.set_exception(RequestError(f"request id {rid!r} is already in use"))
                return future
            self._pending[rid] = future
            self._open[rid] = OpenRequest(request, set(range(request.sampling_params.n)))
        self._send(AddRequest(request))  # if the child is gone, the reader fails this future
        return future

    def abort(self, request_id: str) -> None:
        self._send(AbortRequest(request_id))

    def abort_all(self) -> None:
        """Abort every open request; each gets a final ABORT output (its stream ends cleanly)."""
        self._send(AbortAll())

    def _send(self, message: Command) -> None:
        """Write a command now if the pipe has room for it, else hand it to the writer thread (behind the others it
        holds): a full pipe (the child is mid-step) never blocks the caller, and no command waits for the writer
        thread to get the interpreter lock from a busy event loop."""
        payload = pickled(message)
        with self._send_lock:
            if not self._queued and self._command_capacity:
                try:
                    if len(payload) + HEADER <= room(self._commands, self._command_capacity):
                        self._commands.send_bytes(payload)
                        return
                except (OSError, EOFError):  # the child is gone: the event loop sees its pipe close
                    return
            self._queued += 1
        self._outbox.put(payload)

    def _write(self) -> None:
        """The writer thread: sends what is queued, all of it as one batch, until the ``None`` after ``Stop``."""
        while True:
            payloads = [self._outbox.get()]
            while True:
                try:
                    payloads.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            last = None in payloads
            payloads = payloads[:payloads.index(None)] if last else payloads
            try:
                if payloads:
                    self._commands.send_bytes(batch(payloads))
            except (OSError, EOFError):  # the child is gone: the event loop sees its pipe close
                return
            with self._send_lock:
                self._queued -= len(payloads)
            if last:
                return

    # -- reading the pipe ----------------------------------------------------------------------------
    def _on_readable(self) -> None:
        """Handle every message waiting in the pipe (on the event loop)."""
        try:
            while not self._stopped.is_set() and self._events.poll(0):
                for message in unbatch(self._events.recv()):
                    self._receive(message)
        except (EOFError, OSError):
            self._child_gone()

    def _read_until_stopped(self, timeout: float | None) -> None:
        """Read on this thread (no event loop attached, or it has stopped) until the child says it stopped."""
        if self._aio is not None and not self._aio.is_closed():
            self._aio.remove_reader(self._events.fileno())
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stopped.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0 or not self._events.poll(left):
                    return
                for message in unbatch(self._events.recv()):
                    self._receive(message)
        except (EOFError, OSError):
            self._child_gone()

    def _receive(self, message: Event) -> None:
        if isinstance(message, Stopped):
            self.error = self.error or message.error
            self._close(self.error or "the engine loop stopped")
            return
        try:
            self._handle(message)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the others
            log.exception("handling the engine's %s message failed", type(message).__name__)

    def _close(self, error: str) -> None:
        """No more messages will come: stop reading and refuse the adds still waiting for an answer."""
        self._stopped.set()
        if self._aio is not None and not self._aio.is_closed():
            try:
                self._aio.remove_reader(self._events.fileno())
            except (RuntimeError, ValueError, OSError):  # a closed loop or pipe
                pass
        self._refuse_pending(error)

    def _handle(self, message: Event) -> None:
        match message:
            case KVSnapshot():
                self.snapshot = message.snapshot
                self.kv_feed.add(message.kv_log)
            case Added():
                self._added(message)
            case Step():
                if message.snapshot is not None:
                    self.snapshot = message.snapshot
                self.kv_feed.add(message.kv_log)
                self.loop_seconds = dict(zip(LOOP_PHASES, message.loop_seconds))
                self._step(message.info, unpack_outputs(message.outputs))
            case Outputs():
                grouped = unpack_outputs(message.outputs)
                self._track(grouped)
                self.on_outputs(grouped)
            case Ended():
                with self._lock:
                    entry = self._open.pop(message.request_id, None)
                if entry is not None:
                    self._observe("on_end", entry.request, message.reason)
            case Dead():
                self.error = message.error
            case _:
                log.warning("unknown message from the engine process: %r", message)

    def _added(self, answer: Added) -> None:
        error = answer.exception()
        with self._lock:
            future = self._pending.pop(answer.request_id, None)
            if error is not None:
                self._open.pop(answer.request_id, None)
        if future is None:
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _step(self, info: StepInfo, grouped: dict[str, list[RequestOutput]]) -> None:
        self.num_steps += 1
        self.last_batch_size = info.batch_size
        self.max_batch_size = max(self.max_batch_size, info.batch_size)
        with self._lock:
            requests = {rid: self._open[rid].request for rid in grouped if rid in self._open}
        self._track(grouped)
        self._observe("on_step", info, grouped, requests)
        if grouped:
            self.on_outputs(grouped)

    def _track(self, grouped: dict[str, list[RequestOutput]]) -> None:
        """Forget the requests whose every sample finished."""
        with self._lock:
            for rid, outs in grouped.items():
                entry = self._open.get(rid)
                if entry is None:
                    continue
                entry.open_samples.difference_update(out.index for out in outs if out.finished)
                if not entry.open_samples:
                    del self._open[rid]

    def _observe(self, method: str, *args) -> None:
        notify(self.observer, method, *args)

    def _child_gone(self) -> None:
        """The pipe closed: fine when stopping, otherwise the child died and its requests fail."""
        if self._process is not None:
            self._process.join(1)
        code = self._process.exitcode if self._process is not None else None
        if self._stopping.is_set() and (code == 0 or self.link is not None):  # a shared one is not ours to wait for
            self._close("the engine loop stopped")
            return
        exited = "exited" if code is None else f"exited (exit code {code})"
        self.error = self.error or f"engine loop died: the engine process {exited}"
        log.error("%s", self.error)
        with self._lock:
            entries, self._open = self._open, {}
        grouped = {rid: e.final_outputs(FinishReason.ERROR, self.error) for rid, e in entries.items()}
        for entry in entries.values():
            self._observe("on_end", entry.request, FinishReason.ERROR)
        if grouped:
            self.on_outputs(grouped)
        self._close(self.error)

    def _refuse_pending(self, error: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(EngineDead(error))


def _on_loop(aio: asyncio.AbstractEventLoop) -> bool:
    return asyncio._get_running_loop() is aio
