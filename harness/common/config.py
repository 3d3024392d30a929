"""Composing the config tree under ``conf/``: the benchmark's ``config.yaml`` and the server's ``serve.yaml``
share its ``model/`` and ``engine/`` groups and their typed schemas (harness.common.schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(config_name: str, overrides: list[str], job_name: str) -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra overrides applied, its hydra node included (no run directory, no
    logging setup): what a Hydra app would be handed, for a program that is not one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def override_value(v: Any) -> str:
    """``v`` as the value of a Hydra override (``key=VALUE``): strings quoted, so a path's commas or spaces stay one
    value rather than a sweep."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)
