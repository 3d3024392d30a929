"""Several API processes behind one port (``server.api_server_count``, vLLM's ``--api-server-count``).

One API process streams every token of every request: JSON, server-sent events, a socket write
per chunk. On a slow host it runs out of CPU before a small model's engine does (qwen3-0.6b on
an H100: ~54 µs per output token, a whole core near 18,500 tok/s). With ``api_server_count = N``
the work is split N ways:

- this process (the launcher) starts one engine process with one pair of pipes per API process
  (harness.serve.engine_process.start_shared) and waits until its engine is ready;
- it then starts N API processes. Each binds the same port with ``SO_REUSEPORT``, so the kernel
  spreads connections over them, and runs the usual app over an ``EngineProcess`` attached to
  its own pipes. The engine routes each request's outputs to the process that added it; KV
  snapshots and logs go to all, so ``/kvbench/*`` and the gauges of ``/metrics`` read the same
  from any of them. The request counters and histograms of ``/metrics`` are each process's own:
  a scrape reaches one process, and counts the requests that one served.
- SIGTERM to the launcher is passed on to every API process (a Ctrl-C reaches them all by
  itself); each drains as one server does, and the engine process stops once all of them have
  said so. An API process whose launcher is gone shuts down; an engine process whose API
  processes are all gone stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import wait
from typing import Any, Callable

from harness.serve.config import ServerConfig
from harness.serve.engine_process import EngineLink, EngineProcess, start_shared
from harness.serve.engine_worker import EngineSetup

# an API process's app, from its engine client and what the engine process reported (model_dir, hardware...)
AppBuilder = Callable[[EngineProcess, dict[str, Any]], Any]

log = logging.getLogger("harness.serve.api_servers")


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening, so no connection lands on it) to ``host:port`` with ``SO_REUSEPORT``: the port
    is known (``port`` 0 picks one) and taken for the API processes, which bind it the same way. Raises OSError
    when it is in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen(host: str, port: int) -> socket.socket:
    sock = reserve_port(host, port)
    sock.listen(2048)
    return sock


def serve_shared(setup: EngineSetup, build_app: AppBuilder, server: ServerConfig) -> int:
    """Serve from ``server.api_server_count`` API processes sharing one engine process (``setup`` builds its engine
    there; ``build_app`` each process's app, both picklable): an exit status, as ``run_uvicorn``'s."""
    count, host = server.api_server_count, server.host
    try:
        reserved = reserve_port(host, server.port)
    except OSError as e:
        log.error("cannot bind %s:%d: %s", host, server.port, e)
        return 1
    port = reserved.getsockname()[1]
    try:
        engine, links = start_shared(setup, count, server.engine_start_timeout_s)
    except BaseException:
        reserved.close()
        raise
    context = multiprocessing.get_context("spawn")
    apis = [context.Process(target=api_main, args=(build_app, server, link, i, port), name=f"kvbench-api-{i}")
            for i, link in enumerate(links)]
    for process in apis:
        process.start()
    for link in links:  # the API processes hold them now: the engine sees EOF once they are all gone
        link.commands.close()
        link.events.close()

    def pass_on(sig, frame) -> None:
        for process in apis:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda sig, frame: None)}  # the group has it already
    log.info("serving at http://%s:%d/v1 from %d API processes (%s), engine process %d%s", host, port, count,
             ", ".join(str(p.pid) for p in apis), engine.pid, "; API key required" if server.api_key else "")
    try:
        for process in apis:
            process.join()
        engine.join(server.shutdown_timeout_s + 30)
        if engine.is_alive():
            log.warning("the engine process did not stop in time; killing it")
            engine.kill()
            engine.join(10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
    codes = [p.exitcode for p in apis]
    if any(code != 0 for code in codes):
        log.error("API processes exited with %s", codes)
        return 1
    log.info("shut down cleanly")
    return 0


def api_main(build_app: AppBuilder, server: ServerConfig, link: EngineLink, index: int, port: int) -> None:
    """One API process: its app over ``link``, on its own socket of the shared port."""
    from harness.serve.cli import run_uvicorn

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [api {index}]: %(message)s")
    loop = EngineProcess(link=link)
    loop.start()  # the engine is ready: this takes its answer
    facts = {**link.ready.extra, "api_server": {"index": index, "count": server.api_server_count}}
    app = build_app(loop, facts)
    sock = listen(server.host, port)
    sys.exit(run_uvicorn(app, server, sockets=[sock], until=multiprocessing.parent_process().sentinel))


def watch(sentinel: int, server) -> threading.Thread:
    """Shut ``server`` down once ``sentinel`` (the launcher's) is ready: the launcher is gone."""

    def run() -> None:
        wait([sentinel])
        server.should_exit = True

    thread = threading.Thread(target=run, name="launcher-watch", daemon=True)
    thread.start()
    return thread
