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
    from harness.models.make_model import ensure_model

    return lambda preset="tiny-qwen3": ensure_model(preset)


@pytest.fixture(scope="session")
def start_server(tiny_model):
    """``start_server(engine_cfg, server_cfg=None, preset=..., names=...)`` -> a running ServerThread
    (``.base_url``, ``.state``) serving a tiny model on a free loopback port; stopped at session end."""
    from engines import create_engine
    from engines.detokenizer import load_tokenizer
    from harness.common.engine import regular_token_ids, warm_up
    from harness.serve.app import create_app
    from harness.serve.config import ServerConfig
    from harness.serve.engine_loop import EngineLoop
    from harness.serve.lifecycle import ServerThread

    started = []

    def start(engine_cfg, server_cfg=None, preset="tiny-qwen3", names=None):
        model_dir = tiny_model(preset)
        engine = create_engine(model_dir, engine_cfg)
        warm_up(engine, regular_token_ids(load_tokenizer(model_dir), engine.model_config.vocab_size), 1)
        app = create_app(EngineLoop(engine), model_dir=model_dir, served_names=names or [preset], cfg=server_cfg or ServerConfig(),
                         engine_label=engine_cfg.name, engine_config=engine_cfg, extra_info={"model_preset": preset})
        server = ServerThread(app).start()
        server.state = app.state.kvbench
        server.model_dir = model_dir
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """run_app in this process, in an empty directory; the jobs' torch thread setting is put back afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)
