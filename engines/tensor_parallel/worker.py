"""A tensor-parallel worker: one process per device beyond the first, holding its shard of the model and of the KV
cache, doing what rank 0 does with its own shard, message by message.

Rank 0 sends a message before each call that runs collectives (a forward, the LM head) or touches the cache (an
allocation, block moves), then makes the call itself; the tensors travel by broadcast on the device group, the
messages by a pipe. A worker never decides anything: the scheduler, the KV manager and the sampler live on rank 0.
A worker that fails sends its traceback and exits; rank 0 turns that into an engine error.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch

from engines.kv.manager import CacheOps
from engines.kv.storage import KVStorage, PageGeometry, page_storage
from engines.model.decoder import CausalLM
from engines.tensor_parallel.inputs import WIRE_DTYPE, InputSpec, unpack


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to join the group and load its shard."""

    model_dir: str
    dtype: str
    device: str  # its own device: cuda:<index>, or cpu
    attn_backend: str
    rank: int
    size: int
    store_port: int  # of rank 0's rendezvous store, on 127.0.0.1
    backend: str  # nccl | gloo
    timeout_s: float
    num_threads: int | None  # torch's CPU threads (None: its default)


# -- messages, rank 0 -> workers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    spec: InputSpec


@dataclass(frozen=True)
class Capture:
    """Capture a forward of these inputs into CUDA graph ``key`` (rank 0 is capturing the same forward)."""

    key: int
    spec: InputSpec


@dataclass(frozen=True)
class Replay:
    key: int


@dataclass(frozen=True)
class Logits:
    rows: int
    upcast: bool


@dataclass(frozen=True)
class Allocate:
    """Allocate the KV cache (``host``: the pinned host cache swapped sequences go to) of ``num_slots`` token slots."""

    num_slots: int
    host: bool


@dataclass(frozen=True)
class PageStorage:
    """Build the virtual-contiguous cache (``engines.kv.storage.page_storage``) and map the start-up pool ``ops``."""

    geometry: PageGeometry
    num_groups: int
    shape: tuple[int, ...]
    ops: CacheOps


@dataclass(frozen=True)
class CacheMoves:
    """A step's page unmaps and maps, then its swaps and copies (blocks of ``block_size`` slots)."""

    ops: CacheOps
    block_size: int


@dataclass(frozen=True)
class ProbeAllReduce:
    """Time ``runs`` all-reduces of ``numel`` elements (rank 0 times the same ones)."""

    numel: int
    runs: int


@dataclass(frozen=True)
class ReportPages:
    """Send back which (request slot, page) -> group the worker's host page storage has mapped (its accounting:
    what a test compares with rank 0's)."""


@dataclass(frozen=True)
class Close:
    pass


# -- messages, workers -> rank 0 -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    stage: str  # "started": imports done, joining the group; "loaded": the shard is loaded


@dataclass(frozen=True)
class Failed:
    error: str


def probe_all_reduce(model: CausalLM, numel: int, runs: int) -> float:
    """Seconds per all-reduce of ``numel`` elements of the model's dtype, the median of ``runs`` after 3 warm-ups."""
    import statistics
    import time

    x = torch.ones(numel, dtype=model.dtype, device=model.device)
    times = []
    for i in range(3 + runs):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        model.tp.all_reduce(x)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def joined_key(rank: int) -> str:
    """The store key a worker sets just before it joins the group: rank 0 joins once every worker has set its own."""
    return f"kvbench/joining/{rank}"


def init_group(backend: str, store: "torch.distributed.Store", rank: int, size: int, timeout_s: float) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))


class Shard:
    """A worker's model shard, KV cache and CUDA graphs."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.device = model.device
        self.storage = KVStorage(None)
        self.host_cache: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def handle(self, msg: object, conn: Connection) -> bool:
        """Do what ``msg`` asks; False once it asks to stop."""
        tp = self.model.tp
        if isinstance(msg, Forward):
            self._forward(msg.spec)
        elif isinstance(msg, Replay):
            self.graphs[msg.key].replay()
        elif isinstance(msg, Logits):
            hidden = torch.empty(msg.rows, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
            self.model.compute_logits(tp.broadcast(hidden), upcast=msg.upcast)
        elif isinstance(msg, Capture):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(msg.spec)
            self.pool = graph.pool()
            self.graphs[msg.key] = graph
        elif isinstance(msg, Allocate):
            self._allocate(msg)
        elif isinstance(msg, CacheMoves):
            from engines.model_runner import move_blocks

            self.storage.apply(msg.ops.unmaps, msg.ops.maps)
            move_blocks(msg.ops, self.model.ops, self.kv_cache, self.host_cache, msg.block_size, self.device)
        elif isinstance(msg, PageStorage):
            self._replace_storage(page_storage(msg.geometry, msg.num_groups, msg.shape, self.model.dtype, self.device))
            self.storage.apply(msg.ops.unmaps, msg.ops.maps)
        elif isinstance(msg, ProbeAllReduce):
            probe_all_reduce(self.model, msg.numel, msg.runs)
        elif isinstance(msg, ReportPages):
            conn.send(dict(getattr(self.storage, "mapped", {})))
        elif isinstance(msg, Close):
            self._replace_storage(KVStorage(None))  # graphs (their captured collectives) go before the group does
            return False
        else:
            raise TypeError(f"unknown message {msg!r}")
        return True

    @property
    def kv_cache(self) -> torch.Tensor | None:
        return self.storage.tensor

    def _replace_storage(self, storage: KVStorage) -> None:
        self.graphs, self.pool = {}, None  # graphs captured over the last cache read it
        self.storage.close()
        self.storage = storage

    def _forward(self, spec: InputSpec) -> None:
        flat = self.model.tp.broadcast(torch.empty(spec.numel, dtype=WIRE_DTYPE, device=self.device))
        ids, positions, meta = unpack(spec, flat)
        self.model(ids, positions, self.kv_cache, meta)

    def _allocate(self, msg: Allocate) -> None:
        if msg.host:
            from engines.model_runner import host_kv_cache

            self.host_cache = host_kv_cache(self.model, msg.num_slots)
        else:
            self._replace_storage(KVStorage(None))  # the last one goes first: both at once may not fit
            self._replace_storage(KVStorage(self.model.allocate_kv_cache(msg.num_slots)))


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: join the group, load the shard, then serve rank 0's messages until it closes the pipe."""
    try:
        from engines.model.loader import load_model
        from engines.model.parallel import TPGroup

        import torch.distributed as dist

        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        conn.send(Ready("started"))
        store = dist.TCPStore("127.0.0.1", spec.store_port, spec.size, is_master=False,
                              timeout=timedelta(seconds=spec.timeout_s))
        store.set(joined_key(spec.rank), "1")
        init_group(spec.backend, store, spec.rank, spec.size, spec.timeout_s)
        tp = TPGroup(spec.rank, spec.size, dist.group.WORLD)
        model = load_model(spec.model_dir, dtype=spec.dtype, device=device, attn_backend=spec.attn_backend, tp=tp)
        shard = Shard(model)
        conn.send(Ready("loaded"))
        with torch.no_grad():
            while True:
                try:
                    msg = conn.recv()
                except EOFError:  # rank 0 is gone: leaving the group would wait for it
                    os._exit(0)
                if not shard.handle(msg, conn):
                    break
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the whole story goes to rank 0
        try:
            conn.send(Failed(f"rank {spec.rank} (pid {os.getpid()}): {traceback.format_exc()}"))
        except OSError:
            pass
        os._exit(1)
