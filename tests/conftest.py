"""Shared fixtures: tiny model directories built once per session, and the gpu marker."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Preset models go to a per-session cache, never the user's ~/.cache."""
    import os

    os.environ["KVBENCH_CACHE"] = str(tmp_path_factory.mktemp("kvbench-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(preset)`` -> directory of that tiny preset, built once per session."""
    from harness.make_model import ensure_model

    return lambda preset="tiny-qwen3": ensure_model(preset)
