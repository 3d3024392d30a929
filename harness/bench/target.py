"""What a job measures: an engine of ours in this process, or a server over HTTP (harness.bench.http.target).

Both give a job the same things in the same order, so one job code (harness.bench.job) plans,
runs, records and reports either: the tokenizer and model shape to plan requests from (before
anything loads), then ``start`` (load the engine, or ask the server what it runs), ``warm_up``,
``run`` (harness.bench.runner's drivers), and ``close``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer

from engines import create_engine
from engines.detokenizer import load_tokenizer
from engines.model.config import ModelConfig
from harness.bench.engine_keeper import KEEPER, engine_key
from harness.bench.roofline import device_ceilings
from harness.bench.runner import RunRecord, run_workload
from harness.common.engine import compute_dtype, regular_token_ids, resolve_model_dir, warm_up
from harness.common.schema import cuda_available
from harness.common.system_info import hardware, hardware_label


class Target(Protocol):
    model_dir: Path  # the tokenizer's and the model config's directory
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    max_len: int  # the longest prompt + output a request may have
    engine: Any  # the engine's config (engines.config) as the run's engine.* columns show it
    engine_label: str
    model_name: str  # the run's `model` column
    device: torch.device | None  # where the engine runs (None: not known)
    compute_dtype: str | None  # what its model computes in (None where unknown: an engine that did not load, a server
    # that does not say)

    def start(self) -> None: ...
    def warm_up(self, num_requests: int) -> None: ...
    def run(self, requests: list, offsets: Any, concurrency: int | None, desc: str, progress: bool) -> RunRecord: ...
    def ceilings(self) -> tuple[float, float] | None: ...
    def parallelism(self) -> tuple[int, float]: ...  # GPUs the model is split over, their all-reduce bytes/s
    def peak_memory(self) -> float: ...
    def metadata(self) -> dict[str, Any]: ...
    def close(self, keep: bool) -> None: ...

    @property
    def served_model(self) -> str: ...  # the model's name in a vLLM-format result

    @property
    def backend(self) -> str: ...  # what sent the requests, in a vLLM-format result


class LocalTarget:
    """An engine of ours (or a transformers baseline) in this process, kept between runs when asked
    (harness.bench.engine_keeper)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.model_dir = resolve_model_dir(spec.model)
        self.model_cfg = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_len = spec.engine.max_model_len or self.model_cfg.max_context
        self.engine, self.engine_label = spec.engine, spec.engine_label
        self.model_name = spec.model.preset if spec.model.path is None else self.model_dir.name
        self.device: torch.device = torch.device("cuda" if cuda_available() else "cpu")
        self._engine = None
        self._key = engine_key(self.model_dir, spec.engine)
        self.reused = False

    def start(self) -> None:
        self._engine, self.reused = KEEPER.acquire(self._key, lambda: create_engine(self.model_dir, self.spec.engine))
        self.device = getattr(self._engine, "device", self.device)

    def warm_up(self, num_requests: int) -> None:
        warm_up(self._engine, regular_token_ids(self.tokenizer, self.model_cfg.vocab_size), num_requests)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def run(self, requests: list, offsets: Any, concurrency: int | None, desc: str, progress: bool) -> RunRecord:
        return run_workload(self._engine, requests, offsets, concurrency, desc=desc, progress=progress)

    def ceilings(self) -> tuple[float, float] | None:
        return device_ceilings(self.device)

    def parallelism(self) -> tuple[int, float]:
        """GPUs the model is split over, and the bytes/s of their all-reduce (bus bandwidth; inf on one GPU)."""
        info = self._engine.tensor_parallel() if hasattr(self._engine, "tensor_parallel") else {}
        return info.get("tensor_parallel_size", 1), info.get("all_reduce_bus_bytes_per_s", math.inf)

    def peak_memory(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else math.nan

    @property
    def compute_dtype(self) -> str | None:
        return compute_dtype(self._engine) if self._engine is not None else None

    def metadata(self) -> dict[str, Any]:
        hw = hardware(self.device)
        out: dict[str, Any] = {"hardware": hw, "hardware_label": hardware_label(hw)}
        if self._engine is not None:
            out.update(engine_reused=self.reused, compute_dtype=self.compute_dtype)
            if hasattr(self._engine, "kv_layout"):  # a KV strategy with a layout of its own to record
                out["kv_layout"] = self._engine.kv_layout()
            if hasattr(self._engine, "tensor_parallel"):  # ours: GPUs, KV memory per GPU and in all, the all-reduce
                out["tensor_parallel"] = tp = self._engine.tensor_parallel()
                n, label = tp["tensor_parallel_size"], out["hardware_label"]
                if n > 1:  # N GPUs, or N processes sharing one CPU
                    out["hardware_label"] = f"{n} x {label}" if self.device.type == "cuda" else f"{label}, {n} processes"
                    out["hardware_label"] += f", tensor parallel {n}"
        return out

    @property
    def served_model(self) -> str:
        return self.model_name

    @property
    def backend(self) -> str:
        return f"kvbench:{self.engine_label}"

    def close(self, keep: bool) -> None:
        if self._engine is not None:  # a failed or interrupted run's engine is never kept: it may hold requests
            KEEPER.release(self._engine, self._key, keep=keep)
            self._engine = None


def open_target(spec) -> Target:
    """The job's target, ready to plan requests from: a server when ``engine=http``, else an engine to load."""
    if spec.engine.name == "http":
        from harness.bench.http.target import HTTPTarget

        return HTTPTarget(spec)
    return LocalTarget(spec)
