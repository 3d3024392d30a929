"""Virtual-contiguous KV storage on a GPU: the CUDA driver's virtual memory API, through ``cuda-bindings``.

One address reservation holds the whole cache ([num_layers, 2] planes of every request
slot's range); a page group is one physical allocation (``cuMemCreate``) per plane, each a
page, mapped (``cuMemMap``, then ``cuMemSetAccess``) where the KV manager puts the group.
(The driver maps an allocation only from its start: an H100 with driver 580 refuses a
nonzero offset, CUDA_ERROR_NOT_SUPPORTED, so a group cannot be one allocation.) torch sees the reservation as one tensor through the CUDA
array interface, so the contiguous kernels run on it unchanged.

Unmapping is not ordered on a stream: a page freed while a launched step may still read it
(asynchronous scheduling) is unmapped only once an event recorded after that step has
completed. Its group may meanwhile be mapped elsewhere: one allocation can back several
addresses at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from engines.kv.storage import KVStorage, PageGeometry


class VMMUnavailable(RuntimeError):
    """The driver's virtual memory API cannot be used here (no bindings, no driver, no support)."""


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise VMMUnavailable(
            "engine vattention on CUDA needs the driver API bindings: pip install 'cuda-bindings>=13,<14' "
            f"(import failed: {e})"
        ) from e
    return driver


def _check(result: tuple, call: str) -> Any:
    """The value of a ``cuda.bindings`` call, or an error naming the call and the driver's code."""
    err, *value = result
    if int(err) != 0:
        raise VMMUnavailable(f"{call} failed: {err.name if hasattr(err, 'name') else err}")
    return value[0] if len(value) == 1 else value


def _allocation_prop(cu: Any, device_index: int) -> Any:
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device_index
    return prop


def granularity(device: torch.device) -> int:
    """The driver's minimum allocation granularity on ``device``, in bytes (2 MiB on an H100)."""
    cu = _driver()
    torch.cuda.init()
    _check(cu.cuInit(0), "cuInit")
    index = device.index if device.index is not None else torch.cuda.current_device()
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check(cu.cuMemGetAllocationGranularity(_allocation_prop(cu, index), flag),
                      "cuMemGetAllocationGranularity"))


class _Span:
    """The reservation as the CUDA array interface describes it (int16: the interface has no bfloat16)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes // 2,), "typestr": "<i2", "data": (ptr, False), "version": 3, "strides": None,
            "stream": None,
        }


class CudaPageStorage(KVStorage):
    def __init__(self, geometry: PageGeometry, num_groups: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(None)  # the tensor comes last, once its memory is reserved
        cu = self.cu = _driver()
        self.geometry = geometry
        self.device = device
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            torch.cuda.current_stream().synchronize()  # torch's primary context is now current on this thread
            self._ctx = _check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
            self._stream = torch.cuda.current_stream()  # where the engine's steps run: unmaps wait on it
        prop = _allocation_prop(cu, index)
        gran = granularity(device)
        if geometry.page_bytes % gran:
            raise VMMUnavailable(f"page size {geometry.page_bytes} B is not a multiple of the driver's allocation "
                                 f"granularity ({gran} B)")
        self._access = cu.CUmemAccessDesc()
        self._access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.reserved_bytes = -(-geometry.total_bytes // gran) * gran
        self._base = int(_check(cu.cuMemAddressReserve(self.reserved_bytes, gran, 0, 0), "cuMemAddressReserve"))
        self._handles: list[Any] = []
        self._mapped: dict[int, int] = {}  # byte offset -> group, of every mapped page
        self._retiring: list[tuple[torch.cuda.Event, list[int]]] = []  # unmaps waiting for a step to complete
        self._retiring_at: dict[int, torch.cuda.Event] = {}
        try:  # a page per plane per group: the driver maps an allocation only from its start (offset 0)
            for _ in range(num_groups + 1):  # the pool's groups, then the anchor
                self._handles.append([_check(cu.cuMemCreate(geometry.page_bytes, prop, 0), "cuMemCreate")
                                      for _ in range(geometry.num_planes)])
        except VMMUnavailable as e:
            self.close()
            raise VMMUnavailable(f"could not create {num_groups} page groups of {geometry.num_planes} pages of "
                                 f"{geometry.page_bytes / 2**20:.0f} MiB ({e})") from e
        span = _Span(self._base, geometry.total_bytes)
        self._span = span  # the tensor's memory is the reservation: keep its description alive with it
        for plane, offset in enumerate(geometry.anchor_offsets()):  # for good: see engines.kv.virtual_manager
            self._map(offset, num_groups, plane)
        self.tensor = torch.as_tensor(span, device=device).view(dtype).view(shape)

    # -- maps -------------------------------------------------------------------------------
    def _map(self, offset: int, group: int, plane: int) -> None:
        cu, g = self.cu, self.geometry
        ptr = cu.CUdeviceptr(self._base + offset)
        _check(cu.cuMemMap(ptr, g.page_bytes, 0, self._handles[group][plane], 0), "cuMemMap")
        _check(cu.cuMemSetAccess(ptr, g.page_bytes, [self._access], 1), "cuMemSetAccess")
        self._mapped[offset] = group
        self.num_map_calls += 2

    def _unmap_now(self, offset: int) -> None:
        _check(self.cu.cuMemUnmap(self.cu.CUdeviceptr(self._base + offset), self.geometry.page_bytes), "cuMemUnmap")
        del self._mapped[offset]
        self._retiring_at.pop(offset, None)
        self.num_map_calls += 1

    def _retire_completed(self) -> None:
        while self._retiring and self._retiring[0][0].query():
            event, offsets = self._retiring.pop(0)
            for offset in offsets:
                if self._retiring_at.get(offset) is event:  # not taken and retired again since
                    self._unmap_now(offset)

    def apply(self, unmaps: list[tuple[int, int]], maps: list[tuple[int, int, int]]) -> None:
        if threading.current_thread() is self._worker:
            _check(self.cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")  # a new thread has no context
        else:
            self.join()
        if not (unmaps or maps or self._retiring):
            return
        t = time.perf_counter()
        self._retire_completed()
        if unmaps:
            event = torch.cuda.Event()
            event.record(self._stream)  # after every step launched so far: the last that may read these pages
            offsets = [o for slot, page in unmaps for o in self.geometry.offsets(slot, page)]
            self._retiring.append((event, offsets))
            for o in offsets:
                self._retiring_at[o] = event
        for slot, page, group in maps:
            for plane, offset in enumerate(self.geometry.offsets(slot, page)):
                if offset in self._retiring_at:  # this address is taken again before its unmap came due
                    self._retiring_at[offset].synchronize()
                    self._unmap_now(offset)
                self._map(offset, group, plane)
        self._retire_completed()
        self.map_seconds += time.perf_counter() - t

    def close(self) -> None:
        """Unmap everything and give the memory and the addresses back."""
        if getattr(self, "_base", None) is None:
            return
        super().close()
        torch.cuda.synchronize(self.device)
        for offset in list(self._mapped):
            self._unmap_now(offset)
        for group in self._handles:
            for handle in group:
                _check(self.cu.cuMemRelease(handle), "cuMemRelease")
        self._handles = []
        _check(self.cu.cuMemAddressFree(self.cu.CUdeviceptr(self._base), self.reserved_bytes), "cuMemAddressFree")
        self._base = None
