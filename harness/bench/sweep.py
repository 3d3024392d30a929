"""A sweep's plan, before any job runs: its jobs in launch order, each checked, each named for the progress line.

Order. Hydra's BasicSweeper runs the cartesian product of ``hydra.sweeper.params`` and the
command line's overrides, keyed in the order each key first appears (the params, then the
command line's new keys; a command-line value replaces a param's in place), the first key
varying slowest. conf/config.yaml puts ``repeat`` first among the params, so with repeats > 1
every setting runs once before any runs again (A B A B, not A A B B) and drift over a long sweep
hits every engine alike. ``jobs`` reproduces that order with the sweeper's own code.

Checks. Every job's config can be composed here as the launcher will compose it (``job_config``),
so the app checks them all before the first runs (harness.bench.app, ``on_multirun_start``): a bad value
in the last setting, or a resumed sweep asked for with another config than its finished runs,
fails in seconds with nothing run or written.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

# The sweep under way in this process: "dir" (where its runs go) and "progress" (its SweepProgress).
CURRENT: dict[str, Any] = {}


class SweepRefused(BaseException):
    """A sweep that must not start (its cause says why). A BaseException, because Hydra turns the
    Exceptions of a callback, where the sweep is checked, into warnings and carries on."""


def uses_basic_sweeper(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.sweeper._target_")).endswith("basic_sweeper.BasicSweeper")


def runs_here(config: DictConfig) -> bool:
    """Whether the jobs run in this process (Hydra's basic launcher), where the callbacks can follow them."""
    return str(OmegaConf.select(config, "hydra.launcher._target_")).endswith("basic_launcher.BasicLauncher")


def jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, in the order Hydra's basic sweeper launches them (the job number is the index)."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def job_config(config: DictConfig, overrides: list[str], num: int) -> DictConfig:
    """The config job ``num`` will run with, composed as Hydra's launchers compose it."""
    cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
    return cfg


def settings(planned: list[list[str]]) -> list[str]:
    """Each job as the overrides that vary across the sweep, the repeat last (``engine=paged arrival.concurrency=64 repeat=1``)."""
    parsed = [dict(o.split("=", 1) for o in job if "=" in o) for job in planned]
    keys = [k for k in dict.fromkeys(k for job in parsed for k in job) if len({job.get(k) for job in parsed}) > 1]
    keys = [k for k in keys if k != "repeat"] + (["repeat"] if "repeat" in keys else [])
    return [" ".join(f"{k.lstrip('+')}={job[k]}" for k in keys if k in job) for job in parsed]
