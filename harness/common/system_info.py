"""What a result was measured on: code version, library versions, hardware, model shape.

A result without its hardware, versions, model shape and config is not a result (docs/methodology.md).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from engines.model.config import ModelConfig

# the server stack too: uvicorn parses HTTP with httptools when it is installed, else with h11 (pure Python, slower)
PACKAGES = ("kvbench", "torch", "transformers", "tokenizers", "triton", "hydra-core", "omegaconf", "numpy", "pandas",
            "pyarrow", "fastapi", "uvicorn", "httptools", "uvloop")
REPO = Path(__file__).resolve().parents[2]


def git_state(repo: Path = REPO) -> dict[str, object]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    # a copy of the tree without .git (a remote GPU machine) can name its commit in KVBENCH_GIT_COMMIT
    commit = git("rev-parse", "HEAD") or os.environ.get("KVBENCH_GIT_COMMIT")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                               "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, gpu_count=torch.cuda.device_count())
    return info


def hardware_label(hw: dict) -> str:
    """A short name for captions: the GPU, or the CPU and its core count."""
    if hw.get("gpu_name"):
        return f"{hw['gpu_name']} ({hw['gpu_memory_bytes'] / 2**30:.0f} GiB)"
    return f"CPU {hw.get('cpu')} ({hw.get('cpu_count')} cores)"


def model_shape(cfg: ModelConfig) -> dict[str, object]:
    shape = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "raw"}
    shape.update(num_parameters=cfg.num_parameters(), kv_bytes_per_token=cfg.kv_bytes_per_token)
    return shape
