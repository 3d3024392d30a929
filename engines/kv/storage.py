"""The KV cache tensor a model runner computes into, and how it follows a KV manager's page maps.

An ordinary allocation (``KVStorage``) serves the paged and contiguous engines. The
virtual-contiguous engine's cache is a virtual range whose pages are mapped as sequences
grow (``engines.kv.virtual_manager``): on a GPU through the driver's virtual memory API
(``engines.kv.cuda_vmm``), elsewhere over an ordinary allocation where mapping is
accounting (``HostPageStorage``), so that every allocator test runs without a GPU.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass

import torch


class KVStorage:
    """An ordinary allocation: nothing to map."""

    def __init__(self, tensor: torch.Tensor | None) -> None:
        self.tensor = tensor
        self.map_seconds = 0.0  # host time spent mapping and unmapping since start-up, cumulative
        self.startup_map_seconds = 0.0  # mapping at start-up (a premapped pool)
        self.num_map_calls = 0  # driver calls (or, off the GPU, the calls they stand for)

        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None

    def apply(self, unmaps: list[tuple[int, int]], maps: list[tuple[int, int, int]]) -> None:
        """Unmap, then map, before the step that needs them is launched (after any ``apply_async`` in flight)."""
        if unmaps or maps:
            raise RuntimeError("this KV cache is an ordinary allocation: it has no pages to map")

    def apply_async(self, unmaps: list[tuple[int, int]], maps: list[tuple[int, int, int]]) -> None:
        """``apply`` on a worker thread, while the host goes on (waiting for the device); the next ``apply``
        (or ``join``) waits for it."""
        self.join()
        self._worker = threading.Thread(target=self._work, args=(unmaps, maps), name="kv-map", daemon=True)
        self._worker.start()

    def _work(self, unmaps: list[tuple[int, int]], maps: list[tuple[int, int, int]]) -> None:
        try:
            self.apply(unmaps, maps)
        except BaseException as e:  # raised in the engine's thread by join()
            self._worker_error = e

    def join(self) -> None:
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._worker_error is not None:
            error, self._worker_error = self._worker_error, None
            raise error

    def close(self) -> None:
        """Give the memory back (the runner is done with it)."""
        self.join()


@dataclass(frozen=True)
class PageGeometry:
    """Where page ``j`` of request slot ``r`` lies in each of the cache's planes ([num_layers, 2] K and V planes of
    [tokens_per_page + num_request_slots * slot_tokens, num_kv_heads, head_dim], one tensor): after the plane's
    anchor page (``engines.kv.virtual_manager``), slot after slot."""

    num_layers: int
    num_request_slots: int
    slot_tokens: int  # a multiple of tokens_per_page
    tokens_per_page: int
    token_bytes: int  # one token of one plane: num_kv_heads * head_dim * itemsize

    @property
    def num_planes(self) -> int:
        return 2 * self.num_layers

    @property
    def page_bytes(self) -> int:
        return self.tokens_per_page * self.token_bytes

    @property
    def plane_tokens(self) -> int:
        return self.tokens_per_page + self.num_request_slots * self.slot_tokens

    @property
    def plane_bytes(self) -> int:
        return self.plane_tokens * self.token_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_planes * self.plane_bytes

    def offsets(self, slot: int, page: int) -> list[int]:
        """Byte offsets of that page in every plane, from the start of the cache."""
        within = (self.tokens_per_page + slot * self.slot_tokens + page * self.tokens_per_page) * self.token_bytes
        return [p * self.plane_bytes + within for p in range(self.num_planes)]

    def anchor_offsets(self) -> list[int]:
        return [p * self.plane_bytes for p in range(self.num_planes)]


def page_storage(geometry: PageGeometry, num_groups: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> KVStorage:
    """Virtual-contiguous storage of ``shape`` on ``device``: driver pages on CUDA, host accounting elsewhere."""
    if device.type == "cuda":
        from engines.kv.cuda_vmm import CudaPageStorage

        return CudaPageStorage(geometry, num_groups, shape, dtype, device)
    # calloc'd (numpy's zeros): a large one is an anonymous mapping the OS backs with zero pages on first touch, so
    # untouched slots cost no memory: the host's own virtual memory stands in for the driver's.
    import numpy as np

    zeros = torch.from_numpy(np.zeros(geometry.total_bytes, dtype=np.uint8))
    return HostPageStorage(zeros.view(dtype).view(shape), geometry)


def host_granularity() -> int:
    """The host's page size: what a CPU stand-in for the driver's allocation granularity maps at."""
    return resource.getpagesize()


class HostPageStorage(KVStorage):
    """Virtual-contiguous storage without a driver: an ordinary allocation of the whole virtual range, and a
    record of which pages are mapped that refuses what the driver would refuse (a page mapped twice, an
    unmapped page unmapped)."""

    def __init__(self, tensor: torch.Tensor, geometry: PageGeometry) -> None:
        super().__init__(tensor)
        self.geometry = geometry
        self.mapped: dict[tuple[int, int], int] = {}  # (slot, page) -> group

    def apply(self, unmaps: list[tuple[int, int]], maps: list[tuple[int, int, int]]) -> None:
        if threading.current_thread() is not self._worker:
            self.join()
        t = time.perf_counter()
        for key in unmaps:
            if self.mapped.pop(key, None) is None:
                raise RuntimeError(f"page {key[1]} of request slot {key[0]} is unmapped twice")
        for slot, page, group in maps:
            if (slot, page) in self.mapped:
                raise RuntimeError(f"page {page} of request slot {slot} is mapped twice")
            self.mapped[(slot, page)] = group
        if maps and len(set(self.mapped.values())) < len(self.mapped):
            raise RuntimeError("a page group is mapped at two pages at once")
        self.num_map_calls += (len(unmaps) + 2 * len(maps)) * self.geometry.num_planes  # unmap; map + access
        self.map_seconds += time.perf_counter() - t
