"""Rank 0 of a tensor-parallel model: its own shard, and the worker processes holding the others.

``ShardedModel`` answers the calls a ``ModelRunner`` makes of a ``CausalLM`` (a forward, the LM head, a KV cache
allocation) by telling the workers first (``engines.tensor_parallel.worker``) and then making the call on its own
shard: the collectives inside join the shards. It starts the workers (one process per device, spawned) and stops
them; a worker that dies or fails becomes a ``WorkerFailed`` error on rank 0's next call (a watchdog aborts the
group, so a call blocked in a collective returns), never a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import warnings
from datetime import timedelta
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

import torch

from engines.kv.manager import CacheOps
from engines.kv.storage import PageGeometry
from engines.kv.metadata import AttentionMetadata
from engines.model.config import ModelConfig
from engines.model.loader import load_model
from engines.model.parallel import TPGroup
from engines.tensor_parallel.inputs import pack
from engines.tensor_parallel.worker import (
    Allocate, CacheMoves, Capture, Close, Failed, Forward, Logits, PageStorage, ProbeAllReduce, Ready, Replay, ReportPages,
    WorkerSpec,
    init_group, joined_key, probe_all_reduce, worker_main,
)

WATCH_INTERVAL_S = 0.2  # how often the watchdog looks at the workers
ABORT_WAIT_S = 10.0  # how long close() waits for the group's abort before it leaves it running


class WorkerFailed(RuntimeError):
    """A tensor-parallel worker died or raised; the message says which and why."""


def worker_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank: on CUDA ``size`` consecutive devices from rank 0's; an error naming both numbers when
    fewer are visible."""
    if device.type != "cuda":
        return [device] * size
    visible = torch.cuda.device_count()
    if device.index + size > visible:
        raise ValueError(f"tensor_parallel_size={size} from {device} needs {device.index + size} CUDA devices, "
                         f"{visible} are visible")
    return [torch.device("cuda", device.index + r) for r in range(size)]


class ShardedModel:
    """Rank 0's shard of the model and the workers holding the rest, behind the interface of a ``CausalLM``."""

    def __init__(self, model_dir: str, *, size: int, dtype: str, device: torch.device, attn_backend: str,
                 timeout_s: float) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine is already running in this process: close it first")
        devices = worker_devices(device, size)
        self.error: str | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()  # the watchdog and the engine's thread both read the pipes and fail the group
        self._abort: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._bus_bandwidth: dict[int, float] = {}
        self.backend = backend = "nccl" if device.type == "cuda" else "gloo"
        # rank 0's rendezvous store, on a port the system picks (no free-port guess that another process could take)
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        self._procs: list[mp.process.BaseProcess] = []
        self._conns = []
        self._started: list[bool] = [False] * (size - 1)  # reported "started": its imports ran
        try:
            for rank in range(1, size):
                # on a CPU the workers take one thread each: the ranks share its cores
                self._spawn(WorkerSpec(str(model_dir), dtype, str(devices[rank]), attn_backend, rank, size,
                                       store.port, backend, timeout_s, 1 if device.type == "cpu" else None))
            self._wait_ready("started", timeout_s)
            self._join_group(store, backend, size, timeout_s)
            self.tp = TPGroup(0, size, dist.group.WORLD)
            self.local = load_model(model_dir, dtype=dtype, device=device, attn_backend=attn_backend, tp=self.tp)
            self._wait_ready("loaded", timeout_s)
        except BaseException as e:
            self.error = f"tensor-parallel start-up failed: {type(e).__name__}: {e}"  # close() kills, aborts
            self.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="kvbench-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _join_group(self, store: "torch.distributed.Store", backend: str, size: int, timeout_s: float) -> None:
        """Join the group as rank 0 once every worker has said, on the store, that it is joining: the group's
        rendezvous would wait ``timeout_s`` for a rank that never comes, so a worker lost before then is an error at
        once, and nothing is left waiting."""
        keys = [joined_key(rank) for rank in range(1, size)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            why = self._dead_worker()
            if why is not None:
                raise WorkerFailed(f"{why} (before it joined the group)")
            if time.monotonic() > deadline:
                raise WorkerFailed(f"the tensor-parallel workers did not join the group in {timeout_s} s")
            time.sleep(0.02)
        init_group(backend, store, 0, size, timeout_s)

    def _spawn(self, spec: WorkerSpec) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, child), name=f"kvbench-tp-rank{spec.rank}", daemon=True)
        proc.start()
        child.close()  # the worker holds this end now: EOF then means it is gone
        self._procs.append(proc)
        self._conns.append(parent)

    # -- what a ModelRunner reads of a CausalLM ----------------------------------------------------------------
    @property
    def cfg(self) -> ModelConfig:
        return self.local.cfg

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def ops(self) -> ModuleType:
        return self.local.ops

    @property
    def num_kv_heads(self) -> int:
        return self.local.num_kv_heads

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """The forward on every rank: inputs packed and broadcast, each shard run; rank 0's hidden states."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with self._guard():
            spec, flat = pack(ids, positions, meta)
            self._send(Capture(ids.shape[0], spec) if capturing else Forward(spec))
            self.tp.broadcast(flat)
            return self.local(ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        with self._guard():
            hidden = hidden.contiguous()
            self._send(Logits(hidden.shape[0], upcast))
            return self.local.compute_logits(self.tp.broadcast(hidden), upcast=upcast)

    def allocate_kv_cache(self, num_slots: int, device: torch.device | None = None) -> torch.Tensor:
        with self._guard():
            self._send(Allocate(num_slots, host=device is not None and device.type == "cpu"))
            return self.local.allocate_kv_cache(num_slots, device)

    # -- the runner's other calls --------------------------------------------------------------------------------
    def cache_ops(self, ops: CacheOps, block_size: int) -> None:
        """Have the workers make a step's page maps, swaps and copies in their shards of the cache (rank 0 makes its
        own)."""
        with self._guard():
            self._send(CacheMoves(ops, block_size))

    def page_storage(self, geometry: PageGeometry, num_groups: int, shape: tuple[int, ...], ops: CacheOps) -> None:
        """Have the workers build their virtual-contiguous caches (their KV heads of the same pages) and map ``ops``."""
        with self._guard():
            self._send(PageStorage(geometry, num_groups, shape, ops))

    def check(self) -> None:
        """Raise ``WorkerFailed`` if a worker is gone: a step whose collectives the watchdog aborted may still
        complete on the device (its tokens are garbage), so the runner checks before it reads them."""
        why = self.error or self._dead_worker()
        if why is not None:
            self._fail(why)
            raise WorkerFailed(self.error)

    def mapped_pages(self) -> list[dict]:
        """Each worker's host page accounting ((request slot, page) -> group), in rank order: rank 0's should match."""
        with self._guard():
            self._send(ReportPages())
            return [conn.recv() for conn in self._conns]

    def replay_graph(self, key: int) -> None:
        """Have the workers replay their CUDA graph ``key`` (rank 0 replays its own next)."""
        with self._guard():
            self._send(Replay(key))

    def all_reduce_bus_bandwidth(self, nbytes: int, runs: int = 10) -> float:
        """Bytes/s of the group's all-reduce at ``nbytes`` as NCCL's tests report it (bus bandwidth: the bytes each
        device sends and receives, 2 (N - 1) / N of the buffer, over the time), measured once per size."""
        if nbytes not in self._bus_bandwidth:
            numel = max(1, nbytes // self.dtype.itemsize)
            with self._guard():
                self._send(ProbeAllReduce(numel, runs))
                seconds = probe_all_reduce(self.local, numel, runs)
            n = self.tp.size
            self._bus_bandwidth[nbytes] = numel * self.dtype.itemsize * 2 * (n - 1) / n / seconds
        return self._bus_bandwidth[nbytes]

    # -- workers ------------------------------------------------------------------------------------------------
    def _send(self, msg: object) -> None:
        if self.error is not None:
            raise WorkerFailed(self.error)
        for rank, conn in enumerate(self._conns, 1):
            try:
                conn.send(msg)
            except OSError as e:
                # the worker is dying: it may still be in the last step's collectives, so the group is aborted (left
                # as it is, NCCL's teardown would wait for it forever); its exit code follows its pipe's end shortly
                self._fail(self._dead_worker(wait_s=5.0) or f"tensor-parallel worker rank {rank}: {e}")
                raise WorkerFailed(self.error) from e

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn an error that a dead worker caused (a collective with it failing) into ``WorkerFailed`` naming it.
        Any error inside a call fails the group: the workers may be in collectives rank 0 will never make."""
        try:
            yield
        except WorkerFailed:
            raise
        except Exception as e:
            why = self.error or self._dead_worker(wait_s=1.0)
            if why is None:
                self._fail(f"rank 0 failed in a tensor-parallel call ({type(e).__name__}: {e}); the ranks are out of step")
                raise
            self._fail(why)
            raise WorkerFailed(self.error) from e

    def _fail(self, why: str) -> None:
        """Record the first reason the group is unusable, and abort it once (collectives blocked in it return).

        The abort runs on a thread of its own: with a CUDA graph's collectives waiting on a dead peer, NCCL's abort
        may never return, and the caller must still raise."""
        with self._lock:
            if self.error is None:
                self.error = why
            if self._abort is None:
                self._abort = threading.Thread(target=_abort_group, name="kvbench-tp-abort", daemon=True)
                self._abort.start()

    def _failure(self, rank: int) -> str | None:
        """Why worker ``rank`` is gone (its own traceback if it sent one), or None while it runs."""
        with self._lock:
            return self._gone(rank)

    def _gone(self, rank: int) -> str | None:
        proc, conn = self._procs[rank - 1], self._conns[rank - 1]
        proc.join(timeout=0)
        if proc.is_alive():
            return None
        why = f"tensor-parallel worker rank {rank} exited with code {proc.exitcode}"
        try:
            while conn.poll():
                msg = conn.recv()
                if isinstance(msg, Failed):
                    return f"{why}: {msg.error}"
        except (EOFError, OSError):
            pass
        if not self._started[rank - 1]:
            why += (" before it started: the workers are spawned, so a script that builds a tensor-parallel engine "
                    "must run under `if __name__ == \"__main__\":`")
        return why

    def _dead_worker(self, wait_s: float = 0.0) -> str | None:
        """The first worker found gone within ``wait_s`` (a collective may fail a moment before its peer is reaped)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank in range(1, len(self._procs) + 1):
                why = self._failure(rank)
                if why is not None:
                    return why
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _wait_ready(self, stage: str, timeout_s: float) -> None:
        """Wait for every worker to report ``stage``; a worker that fails meanwhile is an error naming it."""
        deadline = time.monotonic() + timeout_s
        for rank, conn in enumerate(self._conns, 1):
            while not conn.poll(0.1):
                why = self._failure(rank)
                if why is not None:
                    raise WorkerFailed(why)
                if time.monotonic() > deadline:
                    raise WorkerFailed(f"tensor-parallel worker rank {rank} did not report {stage!r} in {timeout_s} s")
            try:
                msg = conn.recv()
            except EOFError:
                self._procs[rank - 1].join(timeout=5)
                raise WorkerFailed(self._failure(rank) or f"tensor-parallel worker rank {rank} closed its pipe") from None
            if isinstance(msg, Failed):
                raise WorkerFailed(f"tensor-parallel worker rank {rank} failed: {msg.error}")
            if msg != Ready(stage):
                raise WorkerFailed(f"tensor-parallel worker rank {rank} sent {msg!r}, expected {Ready(stage)!r}")
            self._started[rank - 1] = True

    def _watch(self) -> None:
        """Abort the group when a worker dies, so that rank 0 blocked in a collective with it gets an error."""
        try:
            while not self._closing.wait(WATCH_INTERVAL_S):
                why = self._dead_worker()
                if why is not None:
                    self._fail(why)
                    return
        except Exception as e:  # noqa: BLE001 - a watchdog that dies silently would let a dead worker hang the engine
            self._fail(f"the tensor-parallel watchdog failed: {type(e).__name__}: {e}")

    def close(self) -> None:
        """Stop the workers (each finishes its message, leaves the group and exits) and leave the group: rank 0 leaves
        while they do, as NCCL's teardown may wait for every rank. A failed group is aborted and its workers killed."""
        import torch.distributed as dist

        self._closing.set()
        if self._watchdog is not None:
            self._watchdog.join()
        lost = False
        for conn in self._conns:
            try:
                conn.send(Close())
            except OSError:
                lost = True
        if self.error is None and self._conns:  # a worker lost since the last call: leaving the group would wait for it
            why = self._dead_worker(wait_s=5.0 if lost else 0.0)
            if why is not None or lost:
                self.error = why or "a tensor-parallel worker closed its pipe"
        if self.error is not None:
            self._fail(self.error)
            for proc in self._procs:
                proc.kill()
            self._abort.join(ABORT_WAIT_S)
            if self._abort.is_alive():
                warnings.warn(f"the tensor-parallel group's abort did not return in {ABORT_WAIT_S:.0f} s: rank 0's "
                              "device may hold a collective that waits forever; restart the process to use it")
        elif dist.is_initialized():
            dist.destroy_process_group()
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self.local = None


def _abort_group() -> None:
    """Abort the default group's communicators (pending collectives return an error), and forget the group."""
    from torch.distributed import distributed_c10d as c10d

    try:
        c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - a backend without abort: its collectives fail on the closed peer anyway
        pass
