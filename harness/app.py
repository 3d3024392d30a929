"""The Hydra app: ``python -m harness [+experiment=NAME] [overrides]`` (and ``harness ...``).

Config tree: ``conf/`` (config.yaml and the engine/, model/, workload/, arrival/,
experiment/ and hydra/launcher/ groups), typed by harness.schema. An experiment that
sweeps is a Hydra multirun (``hydra.sweeper.params`` in its config), so launchers scale it
out: each job writes its own run directory, and the report is written when the sweep ends.
User errors (an unknown engine or key, a bad value, a missing file) end the program with
one line naming the problem and status 2; ``HYDRA_FULL_ERROR=1`` shows tracebacks. An
engine that fails mid-run is recorded in its run directory, the sweep goes on, and the
program ends with status 1 and one line naming the first failure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from tqdm.auto import tqdm

from engines.model.config import ModelLoadError
from engines.request import RequestError
from harness.job import JobSpec, execute
from harness.schema import ArrivalSpec, ModelSpec, SLOSpec, UserError, WorkloadSpec, register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

register_configs()
# conf/hydra/launcher/*.yaml set our defaults for the launcher plugins' configs of the same
# names, which Hydra checks against the plugins' schemas, warning that this is deprecated.
warnings.filterwarnings("ignore", message=r"\n'hydra/launcher/\w+' is validated against ConfigStore schema")


def job_params() -> dict[str, Any]:
    """This job's overrides as typed values (e.g. engine=paged, arrival.concurrency=8), the experiment choice left out."""
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {o.key_or_group: o.value() for o in parsed if o.key_or_group != "experiment"}


def engine_config(cfg: DictConfig, label: str) -> Any:
    """The engine dataclass, with the experiment's settings for this engine config merged (and checked) in."""
    node = cfg.engine
    if label in cfg.engine_overrides:
        node = OmegaConf.merge(node, cfg.engine_overrides[label])
    return OmegaConf.to_object(node)


def job_spec(cfg: DictConfig) -> JobSpec:
    choices = HydraConfig.get().runtime.choices
    label = choices.get("engine") or cfg.engine.name
    typed = {name: OmegaConf.to_object(cfg[name]) for name in ("model", "workload", "arrival", "slo")}
    assert isinstance(typed["model"], ModelSpec) and isinstance(typed["workload"], WorkloadSpec)
    assert isinstance(typed["arrival"], ArrivalSpec) and isinstance(typed["slo"], SLOSpec)
    return JobSpec(
        name=cfg.name, seed=cfg.seed, engine_label=label, engine=engine_config(cfg, label), **typed,
        warmup_requests=cfg.warmup_requests, torch_threads=cfg.torch_threads, require_cuda=cfg.require_cuda, params=job_params(),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> str:
    spec = job_spec(cfg)
    return execute(spec, Path(HydraConfig.get().runtime.output_dir), progress=sys.stderr.isatty())


def _sweep_size(config: DictConfig) -> int:
    """How many jobs the basic sweeper will run: the product of the swept values (the command line wins)."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    counts: dict[str, int] = {}
    for o in OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task)):
        counts[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_discrete_sweep() else 1
    return math.prod(counts.values())


class HarnessCallback(Callback):
    """A progress bar over a sweep's jobs, and the report when a run or a sweep ends."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"results: {config.hydra.sweep.dir}", file=sys.stderr)
        self.bar = tqdm(total=_sweep_size(config), desc=f"sweep {config.name}", unit="run", disable=not sys.stderr.isatty())

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        _finish(Path(config.hydra.sweep.dir), config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        _finish(Path(config.hydra.runtime.output_dir), config)


# Runs that failed (directory, reason), found by the callback when a run or sweep ends; run_app's exit status.
FAILED_RUNS: list[tuple[str, str]] = []


def _finish(run_dir: Path, config: DictConfig) -> None:
    """Note failed runs and write the report of everything under ``run_dir``."""
    from harness.report import write_report
    from harness.results import find_runs

    runs = find_runs([run_dir])[0]
    FAILED_RUNS.extend((str(r.path), r.metadata.get("reason", "")) for r in runs if r.status == "failed")
    if runs and config.report:  # a run that stopped at a user error wrote nothing to report
        path = write_report([run_dir], Path(config.report_dir) if config.report_dir else run_dir)
        print(f"report: {path}", file=sys.stderr)


def describe_error(e: BaseException) -> str:
    """One line naming the problem: the missing option and the choices, or the unknown key and the valid ones."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if e.options:
            return f"unknown {group or 'config'} {option!r}; choose one of: {', '.join(sorted(e.options))}"
        return f"could not find config {e.missing_cfg_file!r}"
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) and e.__cause__ is not None else e
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and " not in " in str(cause):
        override = re.search(r"Could not override '([^']+)'", str(e))
        key = getattr(cause, "full_key", None) or (override.group(1) if override else str(cause.key))
        keys = _valid_keys(cause.object_type)
        return f"unknown key {key!r}" + (f"; valid keys here: {', '.join(keys)}" if keys else "")
    if isinstance(cause, OmegaConfBaseException):
        first = str(cause).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        return f"{key}: {first}" if key and key not in first else first
    return " ".join(str(e).split()) or type(e).__name__


def _valid_keys(object_type: Any) -> list[str]:
    if isinstance(object_type, type) and dataclasses.is_dataclass(object_type):
        return sorted(f.name for f in dataclasses.fields(object_type))
    return []


USER_ERRORS = (UserError, RequestError, ModelLoadError, ConfigCompositionException, OmegaConfBaseException)


class _QuietHydraStderr:
    """stderr without Hydra's "Error executing job with overrides" line, so an error stays one line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return 0 if text.startswith("Error executing job with overrides") else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def run_app(argv: list[str]) -> int:
    """Run the Hydra app on ``argv`` (overrides and Hydra flags); the exit status."""
    show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved_argv, saved_stderr = sys.argv, sys.stderr
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we print one line (or the traceback if the user asked)
    sys.argv = [saved_argv[0] if saved_argv else "harness", *argv]
    sys.stderr = _QuietHydraStderr(saved_stderr)
    FAILED_RUNS.clear()
    try:
        _main()
    except KeyboardInterrupt:
        print("interrupted: finished runs keep their results (summarize them with `harness report DIR`)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help and friends
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        if show_tracebacks:
            raise
        if isinstance(e, USER_ERRORS):
            print(f"error: {describe_error(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {describe_error(e)} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        sys.argv, sys.stderr = saved_argv, saved_stderr
        if not show_tracebacks:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if FAILED_RUNS:
        where, reason = FAILED_RUNS[0]
        print(f"error: {len(FAILED_RUNS)} run(s) failed; the first, {where}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0
