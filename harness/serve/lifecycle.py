"""Running the app under uvicorn, with a graceful shutdown that never leaves a request hanging.

On SIGTERM (or ``should_exit``) uvicorn stops accepting connections and waits for the open
ones. ``GracefulServer`` gives in-flight requests ``drain_s`` seconds to finish; then it
aborts whatever is still running in the engine, so every stream still open gets its last
chunk (``finish_reason: "abort"``) and ``data: [DONE]``, and every connection closes on its
own. uvicorn's own timeout (a few seconds later) is only a backstop.

``ServerThread`` runs the same server in a background thread of this process (tests,
notebooks): ``with ServerThread(app) as server: httpx.get(server.base_url + "/health")``;
``harness serve`` runs it in the main thread, where uvicorn handles the signals.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

import uvicorn

log = logging.getLogger(__name__)

BACKSTOP_S = 10.0  # after the drain, how long uvicorn waits before it cancels what is left


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_s: float, abort_all: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self.abort_all = abort_all
        self._drain_task: asyncio.Task | None = None

    async def shutdown(self, sockets=None) -> None:
        if self.abort_all is not None and self.server_state.connections:
            log.info("shutting down: in-flight requests get %.1f s to finish, then they are aborted", self.drain_s)
            self._drain_task = asyncio.create_task(self._abort_after_drain())
        try:
            await super().shutdown(sockets)
        finally:
            if self._drain_task is not None and not self._drain_task.done():
                self._drain_task.cancel()

    async def _abort_after_drain(self) -> None:
        await asyncio.sleep(self.drain_s)
        log.info("aborting the requests still running after %.1f s", self.drain_s)
        self.abort_all()


def make_server(app, host: str, port: int, *, drain_s: float, log_level: str = "info", access_log: bool = False) -> GracefulServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=drain_s + BACKSTOP_S, timeout_keep_alive=5)
    state = getattr(app.state, "kvbench", None)
    return GracefulServer(config, drain_s, state.loop.abort_all if state is not None else None)


class ServerThread:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 shutdown_timeout_s: float = 5.0) -> None:
        self.server = make_server(app, host, port, drain_s=shutdown_timeout_s, log_level=log_level)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited before it started (is the port in use?)")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
