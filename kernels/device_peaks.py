"""Measured peaks of a GPU: read bandwidth B and bf16 matmul rate F, the two roofline ceilings.

Datasheet figures are upper bounds no kernel reaches; every efficiency this project reports
is against these measurements instead. They are cached as JSON under ~/.cache/kvbench/
(``$KVBENCH_CACHE`` overrides the folder), keyed by the GPU's name.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

READ_BYTES = 2 << 30  # 2 GiB: far beyond any L2, so every byte comes from device memory
GEMM_SIZE = 8192


@dataclass(frozen=True)
class DevicePeaks:
    read_bw_bytes_per_s: float
    bf16_flops_per_s: float
    device_name: str


def cache_path() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", "~/.cache/kvbench")).expanduser() / "device_peaks.json"


def median_time_s(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median of ``runs`` CUDA-event timings of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_read_bandwidth(device: torch.device, nbytes: int = READ_BYTES, runs: int = 20) -> float:
    """Bytes/s of a read-only reduction (a bf16 sum) over ``nbytes`` of random data."""
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    seconds = median_time_s(lambda: x.sum(dtype=torch.float32), runs)
    return x.numel() * x.element_size() / seconds


def measure_bf16_matmul(device: torch.device, n: int = GEMM_SIZE, runs: int = 10) -> float:
    """FLOP/s of an ``n``-cubed bf16 matrix product on random data (zeros run faster)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    seconds = median_time_s(lambda: torch.matmul(a, b), runs)
    return 2 * n**3 / seconds


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
    tmp.replace(path)


def measure_peaks(device: torch.device) -> DevicePeaks:
    """Measure both peaks now (about ten seconds on an H100)."""
    with torch.cuda.device(device):
        return DevicePeaks(measure_read_bandwidth(device), measure_bf16_matmul(device), torch.cuda.get_device_name(device))


def device_peaks(device: torch.device | str | int | None = None, *, refresh: bool = False) -> DevicePeaks:
    """The peaks of ``device`` (default: the current CUDA device), measured once per GPU model."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    path = cache_path()
    entries = _load(path)
    entry = entries.get(name)
    if entry is None or refresh:
        entry = {
            **asdict(measure_peaks(device)),
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }
        entries[name] = entry
        _save(path, entries)
    return DevicePeaks(entry["read_bw_bytes_per_s"], entry["bf16_flops_per_s"], entry["device_name"])
