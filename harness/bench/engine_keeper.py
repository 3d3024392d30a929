"""One engine kept loaded between consecutive runs of a sweep that ask for the same one (``reuse_engine=true``).

A rate sweep against vLLM runs every rate against one server; rebuilding a 13B model and its
CUDA graphs for each point would cost more than the point. A kept engine is handed to the next
run only if that run asks for the same model directory and the same engine settings, and only
if the engine is idle with no KV memory held or cached, so nothing of the last run carries
over (an engine with a filled prefix cache is rebuilt instead). Any other run closes it first,
so two engines never share the device.
"""

from __future__ import annotations

import atexit
import gc
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from engines.base import Engine
from harness.common.engine import freeze_heap


def engine_key(model_dir: Path, cfg: Any) -> str:
    return json.dumps([str(model_dir), type(cfg).__name__, asdict(cfg)], sort_keys=True, default=str)


def is_clean(engine: Engine) -> bool:
    """Idle, and holding no KV memory, not even cached blocks: a new run on it starts as on a new engine."""
    if engine.has_unfinished():
        return False
    stats = engine.kv_stats()
    return stats.allocated == 0 and stats.cached == 0


class EngineKeeper:
    """Holds at most one idle engine between runs."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._engine: Engine | None = None

    def acquire(self, key: str, build: Callable[[], Engine]) -> tuple[Engine, bool]:
        """The kept engine if it is the one asked for and clean (and True), else a new one from ``build`` (and False)."""
        if self._engine is not None and self._key == key and is_clean(self._engine):
            engine, self._engine, self._key = self._engine, None, None
            return engine, True
        self.close()
        engine = build()
        freeze_heap()
        return engine, False

    def release(self, engine: Engine, key: str, keep: bool) -> None:
        """Keep ``engine`` for the next run (``keep``), or close it."""
        if keep:
            self.close()
            self._key, self._engine = key, engine
        else:
            _close(engine)

    def close(self) -> None:
        engine, self._engine, self._key = self._engine, None, None
        if engine is not None:
            _close(engine)

    @property
    def holding(self) -> bool:
        return self._engine is not None


def _close(engine: Engine) -> None:
    engine.close()
    del engine
    gc.unfreeze()  # its objects, cycles included, can be collected again
    gc.collect()  # the device memory of its tensors goes back before the next engine is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


KEEPER = EngineKeeper()
atexit.register(KEEPER.close)
