"""The engine process's side of ``EngineProcess`` (harness.serve.engine_process): the engine loop, fed by a pipe.

``worker_main`` is the spawned process's entry point: it builds the engine from the parent's
picklable ``setup`` callable, answers ``Ready`` (or ``StartFailed``), then runs the very same
``EngineLoop`` as a server thread would, on its main thread. Between steps the loop applies
the parent's commands; whatever it would tell the server (KV snapshots, each step's outputs
with its ``StepInfo``, requests that ended early) goes to the parent as events
(harness.serve.messages), in order, without ever waiting on the parent's reading
(harness.serve.pipe.Outbox). The loop times itself (``loop_seconds``) and sends the totals with
every step.

The worker ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): the parent
decides when it stops, and a worker whose parent is gone sees the pipe close and exits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from engines.base import Engine, KVStats
from engines.kv.accounting import KVLog
from engines.request import FinishReason, Request, RequestOutput
from harness.serve.engine_loop import EngineDead, EngineLoop, LoopObserver, StepInfo
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
    pack_outputs,
)
from harness.serve.pipe import Outbox, unbatch

log = logging.getLogger(__name__)

# setup() runs in the engine process: it returns the engine, ready to serve, and facts to hand the parent
EngineSetup = Callable[[], tuple[Engine, dict[str, Any]]]


def worker_main(setup: EngineSetup, commands: Connection, events: Connection) -> None:
    """The engine process: build the engine, say whether that worked, then run the loop until it stops (``Stop``,
    the parent gone, or the engine failed) and say so last."""
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
        events.send(StartFailed(describe_error(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}", user))
        return
    loop = _ForwardingLoop(engine, commands, events)
    events.send(Ready(loop.info, extra, loop.snapshot))
    loop.run()
    try:
        loop.flush(block=True)
        events.send(Stopped(loop.error))
        events.close()
    except (OSError, EOFError):
        pass


class _ForwardingLoop(EngineLoop):
    """The engine loop of the engine process, on its main thread: commands come from the pipe between steps, and
    whatever the loop would tell the server goes down the pipe.

    One thread only: a second one reading the pipe would wait for the interpreter lock behind every
    step, and a burst of new requests would reach the engine one switch interval at a time.
    """

    def __init__(self, engine: Engine, commands: Connection, events: Connection) -> None:
        self._commands = commands
        self._outbox = Outbox(events)
        self._sent: KVStats | None = None
        super().__init__(engine, lambda grouped: self._send(Outputs(pack_outputs(grouped))), max_queue=2**62,
                         observer=_EndForwarder(self._send))

    def _send(self, message: Event) -> None:
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

    def _command(self, command: Command) -> None:
        match command:
            case AddRequest(request=request):
                future: concurrent.futures.Future = concurrent.futures.Future()
                self._add(request, future)
                e = future.exception()
                self._send(Added(request.request_id) if e is None else Added.refused(request.request_id, e))
            case AbortRequest(request_id=request_id):
                self._abort(request_id)
            case AbortAll():
                self._abort_all("aborted: the server is shutting down")
            case Stop():
                self._stopping.set()

    def _kv_update(self) -> tuple[KVStats | None, KVLog | None]:
        """The KV snapshot when it changed since the last message, and the engine's log since then (None: empty)."""
        t0 = time.perf_counter()
        self.snapshot = self.engine.kv_stats()
        kv_log = self.engine.kv_log()
        changed = self.snapshot != self._sent
        self._sent = self.snapshot
        self.loop_seconds["kv"] += time.perf_counter() - t0
        return (self.snapshot if changed else None), (kv_log if kv_log.samples or kv_log.allocations else None)

    def _publish(self) -> None:
        snapshot, kv_log = self._kv_update()
        if snapshot is not None or kv_log is not None:
            self._send(KVSnapshot(self.snapshot, kv_log))

    def _deliver_step(self, info: StepInfo, grouped: dict[str, list[RequestOutput]], requests: dict[str, Request]) -> None:
        """One message per step: its outputs, the KV snapshot after it when that changed, and the KV log."""
        snapshot, kv_log = self._kv_update()
        self._send(Step(info, pack_outputs(grouped), snapshot, kv_log, tuple(self.loop_seconds.values())))
        self.flush()

    def _fail_all(self, error: str) -> None:
        self._send(Dead(error))  # first, so the server refuses new requests before it sees the failures
        super()._fail_all(error)

    def _refuse_inbox(self, error: str) -> None:
        """Commands still in the pipe after the engine died: refuse the adds."""
        try:
            while self._commands.poll(0):
                for command in unbatch(self._commands.recv()):
                    if isinstance(command, AddRequest):
                        self._send(Added.refused(command.request.request_id, EngineDead(error)))
        except (OSError, EOFError):
            pass


class _EndForwarder(LoopObserver):
    """Tells the parent of requests that ended early; the parent's observer (the server's metrics) sees them there."""

    def __init__(self, send: Callable[[Event], None]) -> None:
        self.send = send

    def on_step(self, info, outputs, requests) -> None:  # steps go down the pipe whole, see _ForwardingLoop
        pass

    def on_end(self, request: Request, reason: FinishReason) -> None:
        self.send(Ended(request.request_id, reason))
