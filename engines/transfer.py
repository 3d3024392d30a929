"""Copies between host and device that never make the host wait for the device.

A copy from pageable host memory may synchronize with the stream (the driver stages it
through pinned memory), and one made without ``non_blocking`` always does. Staging through
torch's caching pinned allocator instead queues the copy and returns; the allocator keeps a
pinned block until the copies reading it have run, so nothing is overwritten in flight.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``; on a GPU queued behind the stream's work without a host sync (a CPU shares it)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, queued behind the stream's work: read it only once an event recorded
    after this call has completed. A CPU tensor is its own copy."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
