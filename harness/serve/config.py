"""The server's typed config, registered in Hydra's ConfigStore, and its composition.

``conf/serve.yaml`` is the primary config: it reuses the ``model/`` and ``engine/`` groups
of the benchmark's config tree (so ``harness serve model=tiny-llama engine=contiguous
engine.max_model_len=2048 server.port=8001`` means what it means for a benchmark run) and
defaults the engine to ``paged``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from engines.config import ENGINE_CONFIGS
from harness.common.config import compose
from harness.common.errors import UserError
from harness.common.schema import ModelSpec, register_engine_schemas


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise (0.0.0.0 serves every interface)
    port: int = 8000
    api_key: Optional[str] = None  # when set, /v1/* needs "Authorization: Bearer KEY"
    served_model_name: List[str] = field(default_factory=list)  # names clients may ask for; default: the model argument
    max_queue: int = 1024  # requests waiting for the engine (not yet running); beyond it: 429 with Retry-After
    retry_after_s: int = 1  # the Retry-After a 429 or 503 carries
    max_body_bytes: int = 16 * 2**20  # larger request bodies get 413
    max_n: int = 64  # most samples one request may ask for
    max_prompts: int = 256  # most prompts in one /v1/completions batch
    shutdown_timeout_s: float = 30.0  # on SIGTERM, in-flight requests get this long to finish before they are aborted
    warmup: bool = True  # run one short request before accepting traffic
    # the engine loop in a process of its own (vLLM's engine core does the same), so HTTP work and engine
    # work never wait on one interpreter lock; false: a thread of the server process
    engine_process: bool = True
    engine_start_timeout_s: float = 1800.0  # how long the engine process may take to load and warm up
    # API processes behind the port (vLLM's --api-server-count), sharing the one engine process: more than one
    # when one process's streams use up its core (harness.serve.api_servers); needs engine_process
    api_server_count: int = 1
    log_level: str = "info"
    access_log: bool = False

    def check(self) -> None:
        problems = [
            (0 <= self.port < 65536, f"server.port must be in [0, 65535], got {self.port}"),
            (self.max_queue >= 1, f"server.max_queue must be >= 1, got {self.max_queue}"),
            (self.max_body_bytes >= 1024, f"server.max_body_bytes must be >= 1024, got {self.max_body_bytes}"),
            (self.max_n >= 1, f"server.max_n must be >= 1, got {self.max_n}"),
            (self.max_prompts >= 1, f"server.max_prompts must be >= 1, got {self.max_prompts}"),
            (self.shutdown_timeout_s >= 0, f"server.shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}"),
            (self.engine_start_timeout_s > 0,
             f"server.engine_start_timeout_s must be > 0, got {self.engine_start_timeout_s}"),
            (self.api_key is None or self.api_key != "", "server.api_key must not be empty (leave it unset for no key)"),
            (self.api_server_count >= 1, f"server.api_server_count must be >= 1, got {self.api_server_count}"),
            (self.api_server_count == 1 or self.engine_process,
             "server.api_server_count > 1 needs server.engine_process=true (the API processes share it)"),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message)


@dataclass
class ServeConfig:
    engine: Any = MISSING  # one of engines.config's dataclasses, chosen in the engine/ group
    model: ModelSpec = field(default_factory=ModelSpec)
    server: ServerConfig = field(default_factory=ServerConfig)
    seed: int = 0


def register_serve_configs() -> None:
    register_engine_schemas()
    ConfigStore.instance().store(name="serve_config", node=ServeConfig)


def compose_serve_config(overrides: list[str]) -> DictConfig:
    """``conf/serve.yaml`` with Hydra overrides applied (no run directory, no logging setup)."""
    if any(o.lstrip("+~").replace(" ", "") == "engine=http" for o in overrides):
        raise UserError("engine=http is the benchmark's target for measuring a server over HTTP (harness bench-serve), "
                        "not an engine to serve; serve one of: " + ", ".join(sorted(ENGINE_CONFIGS)))
    register_serve_configs()
    cfg = compose("serve", overrides, job_name="serve")
    choice = cfg.hydra.runtime.choices.get("engine")
    with open_dict(cfg):
        del cfg["hydra"]
        cfg["engine_label"] = choice or cfg.engine.name
    return cfg


@dataclass
class ResolvedServe:
    """The composed config as objects: the engine dataclass, the model spec, the server settings."""

    engine_label: str
    engine: Any
    model: ModelSpec
    server: ServerConfig
    seed: int
    config: dict


def resolve(cfg: DictConfig) -> ResolvedServe:
    model = OmegaConf.to_object(cfg.model)
    server = OmegaConf.to_object(cfg.server)
    assert isinstance(model, ModelSpec) and isinstance(server, ServerConfig)
    server.check()
    engine = OmegaConf.to_object(cfg.engine)
    label = cfg.get("engine_label") or cfg.engine.name
    return ResolvedServe(label, engine, model, server, cfg.seed,
                         OmegaConf.to_container(cfg, resolve=True))
