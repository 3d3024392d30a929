"""The engine process's side of ``EngineProcess`` (harness.serve.engine_process): the engine loop, fed by a pipe.

``worker_main`` is the spawned process's entry point: it builds the engine from the parent's
picklable ``setup`` callable, answers ``Ready`` (or ``StartFailed``), then runs the very same
``EngineLoop`` as a server thread would, on its main thread. Between steps the loop applies
the parent's commands; whatever it would tell the server (KV snapshots, each step's outputs
with its ``StepInfo``, requests that ended early) goes to the parent as events
(harness.serve.messages), in order, without ever waiting on the parent's reading
(harness.serve.pipe.Outbox). The loop times itself (``loop_seconds``) and sends the totals with
every step. With several API processes (``server.api_server_count``) it has a pair of pipes, a
link, for each: a request's answers go to the link that added it, KV state and failures to all.

The worker ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): the parent
decides when it stops, and a worker whose parent is gone sees the pipe close and exits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import time
from multiprocessing.connection import Connection, wait
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


def worker_main(setup: EngineSetup, commands: list[Connection], events: list[Connection]) -> None:
    """The engine process: build the engine, say whether that worked (on every link), then run the loop until it
    stops (every link said ``Stop`` or closed, or the engine failed) and say so last. One link (a pair of pipes) per
    API process: ``server.api_server_count`` of them."""
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
        failed = StartFailed(describe_error(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}", user)
        for conn in events:
            conn.send(failed)
        return
    loop = _ForwardingLoop(engine, commands, events)
    for conn in events:
        conn.send(Ready(loop.info, extra, loop.snapshot))
    loop.run()
    for link in loop.links:
        if link.gone:
            continue
        try:
            link.outbox.flush(block=True)
            link.outbox.conn.send(Stopped(loop.error))
            link.outbox.conn.close()
        except (OSError, EOFError):
            pass


class _Link:
    """One API process's pair of pipes: its commands in, and what concerns it out."""

    def __init__(self, commands: Connection, events: Connection) -> None:
        self.commands = commands
        self.outbox = Outbox(events)
        self.stopped = False  # it said Stop (it still reads: what its requests' aborts send, then Stopped)
        self.gone = False  # its pipes broke: its API process has exited


class _ForwardingLoop(EngineLoop):
    """The engine loop of the engine process, on its main thread: commands come from the pipes between steps, and
    whatever the loop would tell the server goes down them. Each request's outputs and end go to the link that
    added it; KV snapshots and logs, step timings and failures go to every link.

    One thread only: a second one reading the pipes would wait for the interpreter lock behind every
    step, and a burst of new requests would reach the engine one switch interval at a time.
    """

    def __init__(self, engine: Engine, commands: list[Connection], events: list[Connection]) -> None:
        self.links = [_Link(c, e) for c, e in zip(commands, events)]
        self._owner: dict[str, _Link] = {}  # request id -> the link that added it, while it is open
        self._sent: KVStats | None = None
        super().__init__(engine, self._send_outputs, max_queue=2**62, observer=_EndForwarder(self._send_end))

    def _send(self, message: Event, link: _Link | None = None) -> None:
        """Queue a message for one link, or every open one (pickled now, once per link); ``flush`` writes it."""
        t0 = time.perf_counter()
        for target in (link,) if link is not None else self.links:
            if not target.gone:
                target.outbox.put(message)
        self.loop_seconds["pickle"] += time.perf_counter() - t0

    def _routed(self, grouped: dict[str, list[RequestOutput]]) -> dict[_Link, dict[str, list[RequestOutput]]]:
        """Outputs split by the link that owns their request; a request that has ended is forgotten."""
        if len(self.links) == 1:
            routed = {self.links[0]: grouped}
        else:
            routed = {}
            for rid, outs in grouped.items():
                link = self._owner.get(rid)
                if link is not None:
                    routed.setdefault(link, {})[rid] = outs
        for rid in grouped:
            if rid not in self._open:
                self._owner.pop(rid, None)
        return routed

    def _send_outputs(self, grouped: dict[str, list[RequestOutput]]) -> None:
        for link, outs in self._routed(grouped).items():
            self._send(Outputs(pack_outputs(outs)), link)

    def _send_end(self, request_id: str, reason: FinishReason) -> None:
        link = self._owner.get(request_id)
        if request_id not in self._open:  # else its final outputs follow, and are routed by it
            self._owner.pop(request_id, None)
        if link is not None:
            self._send(Ended(request_id, reason), link)

    def flush(self, block: bool = False) -> None:
        """Write what is queued if the pipes have room (or ``block``): an API process busy with its streams never
        stalls the engine; what it has not read yet goes later, with what came since, as one message."""
        t0 = time.perf_counter()
        for link in self.links:
            if not link.gone:
                try:
                    link.outbox.flush(block)
                except (OSError, EOFError):  # that API process is gone
                    self._close_link(link, gone=True)
        self.loop_seconds["send"] += time.perf_counter() - t0

    def _close_link(self, link: _Link, gone: bool) -> None:
        """An API process said Stop, or went away (``gone``): abort what it still had open; stop when every link
        has closed."""
        if link.gone or link.stopped and not gone:
            return
        link.gone = link.gone or gone
        self._abort_owned(link, "aborted: the server is shutting down")
        link.stopped = True
        if all(l.stopped for l in self.links):
            self._stopping.set()  # the loop ends, and worker_main tells every link that is still there
        elif not link.gone:  # the others carry on: this one's API process is told now, and hears nothing more
            self._send(Stopped(None), link)
            try:
                link.outbox.flush(block=True)
            except (OSError, EOFError):
                pass
            link.gone = True

    def _abort_owned(self, link: _Link, reason: str) -> None:
        """``_abort_all`` for one link's requests."""
        self._abort_open([rid for rid, owner in self._owner.items() if owner is link and rid in self._open], reason)

    def _drain_inbox(self) -> None:
        """Apply every command waiting in the pipes (answers to adds go out at once, if the pipe has room)."""
        for link in self.links:
            try:
                while not link.gone and link.commands.poll(0):
                    for command in unbatch(link.commands.recv()):
                        self._command(command, link)
            except (OSError, EOFError):  # that API process is gone
                self._close_link(link, gone=True)
        if any(l.outbox.pending for l in self.links if not l.gone):
            self.flush()

    def _idle(self) -> None:
        self.flush(block=True)  # nothing to run: no reason to hold anything back
        try:
            wait([l.commands for l in self.links if not l.gone], self.idle_wait_s)
        except (OSError, EOFError):
            pass  # the next drain finds which pipe closed

    def _command(self, command: Command, link: _Link) -> None:
        match command:
            case AddRequest(request=request):
                future: concurrent.futures.Future = concurrent.futures.Future()
                self._add(request, future)
                e = future.exception()
                if e is None:
                    self._owner[request.request_id] = link
                self._send(Added(request.request_id) if e is None else Added.refused(request.request_id, e), link)
            case AbortRequest(request_id=request_id):
                if self._owner.get(request_id) is link:
                    self._abort(request_id)
            case AbortAll():
                self._abort_owned(link, "aborted: the server is shutting down")
            case Stop():
                self._close_link(link, gone=False)

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
        """One message per step and link: its outputs, the KV snapshot after it when that changed, and the KV log."""
        snapshot, kv_log = self._kv_update()
        routed = self._routed(grouped)
        seconds = tuple(self.loop_seconds.values())
        for link in self.links:
            self._send(Step(info, pack_outputs(routed.get(link, {})), snapshot, kv_log, seconds), link)
        self.flush()

    def _fail_all(self, error: str) -> None:
        self._send(Dead(error))  # first, so the servers refuse new requests before they see the failures
        super()._fail_all(error)

    def _refuse_inbox(self, error: str) -> None:
        """Commands still in the pipes after the engine died: refuse the adds."""
        for link in self.links:
            try:
                while link.commands.poll(0):
                    for command in unbatch(link.commands.recv()):
                        if isinstance(command, AddRequest):
                            self._send(Added.refused(command.request.request_id, EngineDead(error)), link)
            except (OSError, EOFError):
                pass


class _EndForwarder(LoopObserver):
    """Tells the owning API process of requests that ended early; its observer (the server's metrics) sees them."""

    def __init__(self, send: Callable[[str, FinishReason], None]) -> None:
        self.send = send

    def on_step(self, info, outputs, requests) -> None:  # steps go down the pipes whole, see _ForwardingLoop
        pass

    def on_end(self, request: Request, reason: FinishReason) -> None:
        self.send(request.request_id, reason)
