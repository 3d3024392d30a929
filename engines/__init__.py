"""Engines behind one contract (engines.base.Engine), built from their typed configs."""

from __future__ import annotations

import importlib
from pathlib import Path

from engines.base import Engine, KVStats
from engines.config import ENGINE_CONFIGS
from engines.request import FinishReason, Request, RequestError, RequestOutput, SamplingParams

# engine name -> (module, class)
ENGINE_CLASSES = {
    "hf": ("engines.hf", "HFEngine"),
    "hf_paged": ("engines.hf_paged", "HFPagedEngine"),
    "contiguous": ("engines.contiguous", "ContiguousEngine"),
    "paged": ("engines.paged", "PagedEngine"),
    "vattention": ("engines.vattention", "VAttentionEngine"),
}


class EngineNotAvailable(RuntimeError):
    """The engine is known but its code has not landed (or its dependencies are missing)."""


def create_engine(model_dir: str | Path, cfg) -> Engine:
    """Build the engine ``cfg.name`` for a model directory; ``cfg`` is one of engines.config's dataclasses."""
    name = cfg.name
    if name not in ENGINE_CLASSES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_CLASSES)}")
    if not isinstance(cfg, ENGINE_CONFIGS[name]):
        raise TypeError(f"engine {name!r} needs a {ENGINE_CONFIGS[name].__name__}, got {type(cfg).__name__}")
    module_name, class_name = ENGINE_CLASSES[name]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise EngineNotAvailable(f"engine {name!r} has not landed yet ({module_name} is missing)") from e
        raise
    return cls.from_config(model_dir, cfg)


__all__ = [
    "ENGINE_CLASSES", "ENGINE_CONFIGS", "Engine", "EngineNotAvailable", "FinishReason", "KVStats",
    "Request", "RequestError", "RequestOutput", "SamplingParams", "create_engine",
]
