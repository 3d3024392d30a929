"""The typed config both the benchmark and the server compose: the model node, the engine schemas, and the
resolvers their YAML files use (``${on_device:CPU_VALUE,CUDA_VALUE}``: a size by the machine; ``${max:A,B,...}``,
``${mul:A,B}``: small arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from engines.config import ENGINE_CONFIGS
from harness.common.errors import UserError


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def on_device(cpu_value: Any, cuda_value: Any) -> Any:
    return cuda_value if cuda_available() else cpu_value


def need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# model: auto picks by device (cuda available?): a tiny model keeps CPU runs to minutes.
AUTO_PRESETS = {False: "tiny-qwen3", True: "qwen3-0.6b"}
MODEL_SOURCES = ("files", "random")


@dataclass
class ModelSpec:
    """A preset (built with random weights on first use) or any local Hugging Face model directory."""

    preset: str = "auto"  # auto = qwen3-0.6b on a GPU, tiny-qwen3 on a CPU
    path: Optional[str] = None  # a model directory; wins over the preset
    seed: int = 0  # weights seed of a preset
    dtype: str = "bfloat16"  # checkpoint dtype a preset is written in
    # files = a preset's weights written to safetensors once and loaded; random = drawn on the device at
    # load, no disk (our engines only; identical to the files when drawn on the same device type)
    source: str = "files"

    def __post_init__(self) -> None:
        from harness.models.presets import PRESETS

        if self.preset == "auto":
            self.preset = AUTO_PRESETS[cuda_available()]
        need(self.source in MODEL_SOURCES, f"model.source must be one of {', '.join(MODEL_SOURCES)}, got {self.source!r}")
        need(self.source == "files" or self.path is None,
              "model.source=random draws a preset's weights; model.path names a directory of files")
        if self.path is not None:
            need(Path(self.path).is_dir(), f"model.path: {self.path!r} is not a directory")
        else:
            need(self.preset in PRESETS, f"model.preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")




def register_resolvers() -> None:
    for name, fn in (("on_device", on_device), ("max", lambda *xs: max(xs)), ("mul", lambda a, b: a * b)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register_engine_schemas() -> None:
    """The engine dataclasses that conf/engine extends (under schema/, not a user choice), and the resolvers."""
    register_resolvers()
    cs = ConfigStore.instance()
    for name, cls in ENGINE_CONFIGS.items():
        cs.store(group="schema/engine", name=name, node=cls)
