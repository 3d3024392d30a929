"""The engine loop in a process of its own, so HTTP work and engine work never share one GIL.

With the engine on a thread of the server process (``EngineLoop``), every step's Python
(scheduling, sampling, detokenizing) and every stream's (JSON, server-sent events, sockets)
take turns on one interpreter lock, and under load each slows the other down. vLLM's v1
engine core runs in its own process for the same reason. ``EngineProcess`` does that here:

- the child builds the engine (model load, KV sizing, warm-up) from a picklable ``setup``
  callable, then runs the very same ``EngineLoop`` on it, and forwards what the loop says
  (KV snapshots, each step's outputs with its ``StepInfo``, requests that ended early) to the
  parent over a pipe, in order;
- the parent keeps the ``EngineLoop`` interface (``add``, ``abort``, ``abort_all``, ``stop``,
  ``snapshot``, ``alive``, ...), so the app does not know which one it has. Once ``attach``ed
  to the server's event loop, it reads the pipe there, whenever it is readable, and calls
  ``on_outputs`` and the observer; no thread of the server's waits for the interpreter lock
  to read a message (a reader thread did, up to a switch interval per message, and the
  child's sends then blocked on a full pipe, stalling the engine).

Neither side waits on the other's reading (harness.serve.pipe). The child writes only when
the pipe has room; what the parent has not read yet waits in its outbox and goes later, with
what came since, as one batch (when idle, it writes everything). The parent writes a command
at once when it fits, and hands it to a writer thread otherwise (and while that one holds
others, to keep their order); a burst of adds then reaches the engine at its next step, instead
of one writer-thread wake-up at a time (each waits for the interpreter lock from the busy
event loop). Step outputs cross as tuples (``pack_outputs``): half the pickling of dataclasses.
The child's loop times itself (``loop_seconds``, harness.serve.engine_loop.LOOP_PHASES) and
sends the totals with every step; ``/kvbench/info`` shows them.

If the child dies (a crash, the OOM killer), every open request gets a final ERROR output
and the server answers 503, as when ``step()`` raises. The child ignores SIGINT and SIGTERM
(a Ctrl-C reaches the whole process group): the parent decides when it stops, and a child
whose parent is gone sees the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import operator
import os
import queue
import signal
import threading
import time
from typing import Any, Callable

from engines.base import Engine, KVStats
from engines.kv.accounting import KVLog
from engines.request import FinishReason, Request, RequestError, RequestOutput
from harness.serve.engine_loop import (
    LOOP_PHASES,
    EngineDead,
    EngineInfo,
    EngineLoop,
    LoopObserver,
    OpenRequest,
    OutputsCallback,
    QueueFull,
    StepInfo,
    notify,
)
from harness.serve.kv_feed import KVFeed
from harness.serve.pipe import HEADER, Outbox, batch, enlarge, pickled, room, unbatch

log = logging.getLogger(__name__)

# setup() runs in the child: it returns the engine, ready to serve, and facts to hand the parent
EngineSetup = Callable[[], tuple[Engine, dict[str, Any]]]


class EngineStartError(RuntimeError):
    """The child could not build the engine; ``user_error`` when the configuration is at fault."""

    def __init__(self, message: str, user_error: bool) -> None:
        super().__init__(message)
        self.user_error = user_error


class EngineProcess:
    def __init__(self, setup: EngineSetup, on_outputs: OutputsCallback | None = None, *, max_queue: int = 1024,
                 observer: LoopObserver | None = None, startup_timeout_s: float = 1800.0) -> None:
        self.setup = setup
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
        self._events, self._child_events = self._context.Pipe(duplex=False)  # child -> parent
        self._child_commands, self._commands = self._context.Pipe(duplex=False)  # parent -> child
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
        """Start the child and wait until its engine is ready (once; later calls do nothing)."""
        if self._process is not None:
            return
        self._process = self._context.Process(target=_child_main, name="kvbench-engine", daemon=True,
                                              args=(self.setup, self._child_commands, self._child_events))
        self._process.start()
        self._child_commands.close()  # the child holds these ends now: EOF then means the other side is gone
        self._child_events.close()
        if not self._events.poll(self.startup_timeout_s):
            self._kill()
            raise EngineStartError(f"the engine process did not become ready in {self.startup_timeout_s:.0f} s", False)
        try:
            message = self._events.recv()
        except EOFError:
            self._process.join(5)
            raise EngineStartError(f"the engine process exited while starting (exit code {self._process.exitcode})",
                                   False) from None
        if message[0] == "failed":
            self._process.join(30)
            raise EngineStartError(message[1], message[2])
        _, self.info, self.extra, self.snapshot = message
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
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return (self._aio is not None and not self._stopped.is_set() and self.error is None
                and not self._stopping.is_set())

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what is still open, stop the child (its engine closes there) and wait for it."""
        self._stopping.set()
        if self._process is None:
            return
        self._send(("stop",))
        self._outbox.put(None)  # the writer's last item
        wait = None if timeout is None else timeout + 10
        if self._aio is not None and self._aio.is_running() and not _on_loop(self._aio):
            self._stopped.wait(wait)  # the event loop reads the child's last messages
        else:
            self._read_until_stopped(wait)
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
        self._send(("add", request))  # if the child is gone, the reader fails this future
        return future

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every open request; each gets a final ABORT output (its stream ends cleanly)."""
        self._send(("abort_all",))

    def _send(self, message: tuple) -> None:
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
        """The writer thread: sends what is queued, all of it as one batch, until the ``None`` after "stop"."""
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

    def _receive(self, message: tuple) -> None:
        if message[0] == "stopped":
            self.error = self.error or message[1]
            self._close(self.error or "the engine loop stopped")
            return
        try:
            self._handle(message)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the others
            log.exception("handling the engine's %s message failed", message[0])

    def _close(self, error: str) -> None:
        """No more messages will come: stop reading and refuse the adds still waiting for an answer."""
        self._stopped.set()
        if self._aio is not None and not self._aio.is_closed():
            try:
                self._aio.remove_reader(self._events.fileno())
            except (RuntimeError, ValueError, OSError):  # a closed loop or pipe
                pass
        self._refuse_pending(error)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "snapshot":
            self.snapshot = message[1]
            self.kv_feed.add(message[2])
        elif kind == "added":
            self._added(message[1], message[2])
        elif kind == "step":
            if message[3] is not None:
                self.snapshot = message[3]
            self.kv_feed.add(message[4])
            self.loop_seconds = dict(zip(LOOP_PHASES, message[5]))
            self._step(message[1], unpack_outputs(message[2]))
        elif kind == "outputs":
            grouped = unpack_outputs(message[1])
            self._track(grouped)
            self.on_outputs(grouped)
        elif kind == "ended":
            with self._lock:
                entry = self._open.pop(message[1], None)
            if entry is not None:
                self._observe("on_end", entry.request, message[2])
        elif kind == "dead":
            self.error = message[1]
        else:
            log.warning("unknown message from the engine process: %r", kind)

    def _added(self, rid: str, error: tuple[str, str] | None) -> None:
        with self._lock:
            future = self._pending.pop(rid, None)
            if error is not None:
                self._open.pop(rid, None)
        if future is None:
            return
        if error is None:
            future.set_result(None)
        else:
            kind, text = error
            future.set_exception(RequestError(text) if kind == "request" else EngineDead(text) if kind == "dead"
                                 else RuntimeError(text))

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
        if self._stopping.is_set() and code == 0:
            self._close("the engine loop stopped")
            return
        self.error = self.error or f"engine loop died: the engine process exited (exit code {code})"
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


# -- the child process ----------------------------------------------------------------------------------
class _ForwardingLoop(EngineLoop):
    """The engine loop of the child, on its main thread: commands come from the pipe between steps, and
    whatever the loop would tell the server goes down the pipe.

    One thread only: a second one reading the pipe would wait for the interpreter lock behind every
    step, and a burst of new requests would reach the engine one switch interval at a time.
    """

    def __init__(self, engine: Engine, commands, events) -> None:
        self._commands, self._events = commands, events
        self._outbox = Outbox(events)
        self._sent: KVStats | None = None
        super().__init__(engine, lambda grouped: self._send(("outputs", pack_outputs(grouped))), max_queue=2**62,
                         observer=_EndForwarder(self._send))

    def _send(self, message: tuple) -> None:
        """Queue a message for the parent (pickled now); ``flush`` writes it."""
        t0 = time.perf_counter()
        self._outbox.put(message)
        self.loop_seconds["pickle"] += time.perf_counter() - t0

    def flush(self, block: bool = False) -> None:
        """Write what is queued if the pipe has room (or ``block``): a parent busy with its streams never stalls the
        engine; what it has not read yet goes later, with what came since, as one message."""
        t0 = time.perf_counter()
        try:
            self._outbox.flush(block)
        except (OSError, EOFError):  # the parent is gone: stop
            self._stopping.set()
        self.loop_seconds["send"] += time.perf_counter() - t0

    def _drain_inbox(self) -> None:
        """Apply every command waiting in the pipe (answers to adds go out at once, if the pipe has room)."""
        try:
            while self._commands.poll(0):
                for command in unbatch(self._commands.recv()):
                    self._command(command)
        except (OSError, EOFError):  # the parent is gone: stop
            self._stopping.set()
        if self._outbox.pending:
            self.flush()

    def _idle(self) -> None:
        self.flush(block=True)  # nothing to run: no reason to hold anything back
        try:
            self._commands.poll(self.idle_wait_s)
        except (OSError, EOFError):
            self._stopping.set()

    def _command(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._add(message[1], future)
            e = future.exception()
            self._send(("added", message[1].request_id, None if e is None else _error_of(e)))
        elif kind == "abort":
            self._abort(message[1])
        elif kind == "abort_all":
            self._abort_all("aborted: the server is shutting down")
        elif kind == "stop":
            self._stopping.set()

    def _kv_update(self) -> tuple[KVStats | None, KVLog | None]:
        """The KV snapshot when it changed since the last message, and the engine's log since then (None: empty)."""
        t0 = time.perf_counter()
        self.snapshot = self.engine.kv_stats()
        log = self.engine.kv_log()
        changed = self.snapshot != self._sent
        self._sent = self.snapshot
        self.loop_seconds["kv"] += time.perf_counter() - t0
        return (self.snapshot if changed else None), (log if log.samples or log.allocations else None)

    def _publish(self) -> None:
        snapshot, log = self._kv_update()
        if snapshot is not None or log is not None:
            self._send(("snapshot", self.snapshot, log))

    def _deliver_step(self, info: StepInfo, grouped: dict[str, list[RequestOutput]], requests: dict[str, Request]) -> None:
        """One message per step: its outputs, the KV snapshot after it when that changed, and the KV log."""
        snapshot, log = self._kv_update()
        self._send(("step", info, pack_outputs(grouped), snapshot, log, tuple(self.loop_seconds.values())))
        self.flush()

    def _fail_all(self, error: str) -> None:
        self._send(("dead", error))  # first, so the server refuses new requests before it sees the failures
        super()._fail_all(error)

    def _refuse_inbox(self, error: str) -> None:
        """Commands still in the pipe after the engine died: refuse the adds."""
        try:
            while self._commands.poll(0):
                for message in unbatch(self._commands.recv()):
                    if message[0] == "add":
                        self._send(("added", message[1].request_id, ("dead", error)))
        except (OSError, EOFError):
            pass


class _EndForwarder(LoopObserver):
    def __init__(self, send: Callable[[tuple], None]) -> None:
        self.send = send

    def on_step(self, info, outputs, requests) -> None:  # steps go down the pipe whole, see _ForwardingLoop
        pass

    def on_end(self, request: Request, reason: FinishReason) -> None:
        self.send(("ended", request.request_id, reason))


def _child_main(setup: EngineSetup, commands, events) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        engine, extra = setup()
    except BaseException as e:  # noqa: BLE001 - the parent reports it and exits
        from harness.common.errors import USER_ERRORS, describe_error

        user = isinstance(e, USER_ERRORS) or isinstance(e, ValueError)
        if not user:
            log.exception("building the engine failed")
        events.send(("failed", describe_error(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}", user))
        return
    loop = _ForwardingLoop(engine, commands, events)
    events.send(("ready", loop.info, extra, loop.snapshot))
    loop.run()
    try:
        loop.flush(block=True)
        events.send(("stopped", loop.error))
        events.close()
    except (OSError, EOFError):
        pass


_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestOutput))
_output_values = operator.attrgetter(*_OUTPUT_FIELDS)


def pack_outputs(grouped: dict[str, list[RequestOutput]]) -> list[tuple]:
    """Outputs as tuples of their fields, in order: pickling them costs half what dataclasses cost, on both sides."""
    return [_output_values(out) for outs in grouped.values() for out in outs]


def unpack_outputs(packed: list[tuple]) -> dict[str, list[RequestOutput]]:
    """``pack_outputs`` undone: the outputs grouped by request, in their order."""
    grouped: dict[str, list[RequestOutput]] = {}
    for values in packed:
        grouped.setdefault(values[0], []).append(RequestOutput(*values))
    return grouped


def _error_of(e: BaseException) -> tuple[str, str]:
    """An exception as (kind, text): exceptions of any class cross the pipe this way."""
    kind = "request" if isinstance(e, RequestError) else "dead" if isinstance(e, EngineDead) else "internal"
    return kind, str(e)


def _on_loop(aio: asyncio.AbstractEventLoop) -> bool:
    return asyncio._get_running_loop() is aio
