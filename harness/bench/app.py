"""The Hydra app: ``python -m harness [+experiment=NAME] [overrides]`` (and ``harness ...``).

Config tree: ``conf/`` (config.yaml and the engine/, model/, workload/, arrival/,
experiment/ and hydra/launcher/ groups), typed by harness.bench.schema. An experiment that
sweeps is a Hydra multirun (``hydra.sweeper.params`` in its config), so launchers scale it
out: each job writes its own run directory, and the report is written when the sweep ends.
``repeats=N`` repeats every setting N times, interleaved (harness.bench.sweep); ``resume=true``
continues the latest sweep, keeping its finished runs (harness.bench.resume). A sweep shows one
progress line (harness.bench.progress); Hydra's and the libraries' INFO lines and bars are silenced.
User errors (an unknown engine or key, a bad value, a missing file) end the program with
one line naming the problem and status 2, and leave no empty run directory behind;
``HYDRA_FULL_ERROR=1`` shows tracebacks. An engine that fails mid-run is recorded in its
run directory, the sweep goes on, and the program ends with status 1 and one line naming
the first failed run (in job order).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.bench import resume, sweep
from harness.bench.engine_keeper import KEEPER
from harness.bench.job import JobSpec, check_device, execute
from harness.bench.progress import Console, SweepProgress
from harness.bench.results import METADATA
from harness.bench.schema import NOT_MEASURED, ArrivalSpec, SLOSpec, WorkloadSpec, check_run_settings, register_configs
from harness.bench.sweep import CURRENT as SWEEP
from harness.common.config import CONF_DIR
from harness.common.errors import USER_ERRORS, describe_error, user_error_in
from harness.common.schema import ModelSpec

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

register_configs()
# conf/hydra/launcher/*.yaml set our defaults for the launcher plugins' configs of the same
# names, which Hydra checks against the plugins' schemas, warning that this is deprecated.
warnings.filterwarnings("ignore", message=r"\n'hydra/launcher/\w+' is validated against ConfigStore schema")


# Overrides that are not settings of a run: no param.* column (the report's sweep axis), no part of a run's folder name.
NOT_PARAMS = ("experiment", "repeat", *NOT_MEASURED)


def job_params(task_overrides: list[str]) -> dict[str, Any]:
    """This job's overrides as typed values (e.g. engine=paged, arrival.concurrency=8), NOT_PARAMS left out, and
    with a server as the target (``engine=http``) its settings too: they say where the run measures, not what."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    params = {o.key_or_group: o.value() for o in parsed if o.key_or_group not in NOT_PARAMS}
    if params.get("engine") == "http":
        params = {k: v for k, v in params.items() if k != "engine" and not k.startswith("engine.")}
    return params


def engine_config(cfg: DictConfig) -> Any:
    """The engine dataclass, with the experiment's settings for this kind of engine merged (and checked) in.

    ``engine_overrides`` is keyed by the engine kind (engine.name), so every engine config of a
    kind gets them: ``contiguous_pow2`` gets the ``contiguous`` settings.
    """
    node = cfg.engine
    if cfg.engine.name in cfg.engine_overrides:
        node = OmegaConf.merge(node, cfg.engine_overrides[cfg.engine.name])
    return OmegaConf.to_object(node)


def job_spec(cfg: DictConfig, hydra_cfg: Any) -> JobSpec:
    """The typed job (every value checked) from the job's config and its hydra node."""
    check_run_settings(cfg)
    label = hydra_cfg.runtime.choices.get("engine") or cfg.engine.name
    typed = {name: OmegaConf.to_object(cfg[name]) for name in ("model", "workload", "arrival", "slo", "saturation")}
    assert isinstance(typed["model"], ModelSpec) and isinstance(typed["workload"], WorkloadSpec)
    assert isinstance(typed["arrival"], ArrivalSpec) and isinstance(typed["slo"], SLOSpec)
    spec = JobSpec(
        name=cfg.name, seed=cfg.seed + cfg.repeat, repeat=cfg.repeat, engine_label=label, engine=engine_config(cfg), **typed,
        warmup_requests=cfg.warmup_requests, torch_threads=cfg.torch_threads, require_cuda=cfg.require_cuda,
        reuse_engine=cfg.reuse_engine, save_vllm_result=cfg.save_vllm_result, params=job_params(hydra_cfg.overrides.task), config=OmegaConf.to_container(cfg, resolve=True),
    )
    check_device(spec)
    return spec


def task_config(cfg: DictConfig) -> DictConfig:
    """A job's config without its hydra node, as Hydra hands it to the task function."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def check_job(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Check everything about one job of a sweep that can be checked before any job runs (harness.bench.sweep);
    the job's run directory and config."""
    spec = job_spec(task_config(cfg), cfg.hydra)
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir), spec.config


# transformers' continuous batching logs through a logger of its own, outside transformers' hierarchy
# and with its own console handler: every hf_paged run would print its INFO lines (start, stop, sizes).
CB_LOGGER = "ContinuousBatchingLogger"


def _quiet_libraries() -> None:
    """transformers' weight-loading bars and INFO logs, and huggingface_hub's bars, would bury the progress line."""
    logging.getLogger(CB_LOGGER).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    if "huggingface_hub" in sys.modules:  # already imported: the variables above came too late
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    try:
        spec = job_spec(cfg, hydra_cfg)
        if cfg.resume and resume.reusable(out, spec.config):
            return "reused"
        _quiet_libraries()
        return execute(spec, out, progress=sys.stderr.isatty() and not _sweeping())
    except USER_ERRORS:
        _stopped(out)
        raise


# _main refers to module state only through functions: a launcher that pickles it by value (submitit) must not
# take the progress line's stream along.
def _sweeping() -> bool:
    """A sweep's progress line is showing (a run's own request bar would fight it)."""
    return "progress" in SWEEP


def _stopped(run_dir: Path) -> None:
    """A run stopped by a user error leaves no folder behind: run_app removes it."""
    _STOPPED.append(run_dir)


class HarnessCallback(Callback):
    """The sweep's progress line, the report when a run or a sweep ends, and the folders a run is about to create."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _note_new_dirs(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check every job before any runs (harness.bench.sweep), then show the progress line."""
        _note_new_dirs(config, "hydra.sweep.dir")
        if not sweep.uses_basic_sweeper(config):
            return
        try:
            where = Path(str(config.hydra.sweep.dir))
            planned = sweep.jobs(config)
            checked = dict(check_job(sweep.job_config(config, overrides, num)) for num, overrides in enumerate(planned))
            if config.resume:
                resume.check_sweep(where, checked)
        except Exception as e:
            raise sweep.SweepRefused() from e
        print(f"results: {where}", file=sys.stderr)
        SWEEP["dir"] = where
        if sweep.runs_here(config):  # other launchers run the jobs (and their callbacks) in other processes
            SWEEP["progress"] = SweepProgress(sweep.settings(planned), sys.stderr)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "progress" in SWEEP:
            SWEEP["progress"].job_start(int(config.hydra.job.num))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if "progress" not in SWEEP:
            return
        ok = job_return.status == JobStatus.COMPLETED
        status = str(job_return.return_value) if ok else "stopped"
        SWEEP["progress"].job_end(int(config.hydra.job.num), status, _headline(Path(config.hydra.runtime.output_dir)) if ok else "")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _close_progress()
        _finish(Path(config.hydra.sweep.dir), config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run says where its results are and its headline, as a sweep's progress line does per run."""
        run_dir = Path(config.hydra.runtime.output_dir)
        headline = _headline(run_dir)
        if (run_dir / METADATA).exists():
            print(f"results: {run_dir}" + (f" ({headline})" if headline else ""), file=sys.stderr)
        _finish(run_dir, config)


def _close_progress() -> None:
    if "progress" in SWEEP:
        SWEEP.pop("progress").close()


def _headline(run_dir: Path) -> str:
    """A finished run's output tokens/s, for its progress line."""
    try:
        run = json.loads((run_dir / METADATA).read_text())["run"]
        return f"{run['output_tok_s']:,.0f} output tok/s" if run.get("output_tok_s") is not None else ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# Runs that failed (directory, reason), found by the callback when a run or sweep ends; run_app's exit status.
FAILED_RUNS: list[tuple[str, str]] = []
# Folders that did not exist before this run or sweep (removed again if it stops at a user error with no results),
# and the run directories of jobs stopped by a user error.
_NEW_DIRS: list[Path] = []
_STOPPED: list[Path] = []


def _note_new_dirs(config: DictConfig, key: str) -> None:
    try:
        target = Path(str(OmegaConf.select(config, key)))
    except Exception:  # noqa: BLE001 - an unresolvable directory is reported when Hydra resolves it
        return
    _NEW_DIRS.extend(p for p in (target, *target.parents) if p != Path(".") and not p.exists())


def _remove_stopped_runs() -> None:
    """Remove what runs stopped by a user error created: their run directories (if they hold no results), then the
    folders this program created that are left empty (or hold only Hydra's multirun.yaml)."""
    for run_dir in _STOPPED:
        if run_dir.is_dir() and not (run_dir / METADATA).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
    for folder in sorted(set(_NEW_DIRS), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {"multirun.yaml"}:
            shutil.rmtree(folder, ignore_errors=True)


def _finish(run_dir: Path, config: DictConfig) -> None:
    """Note failed runs (in job order) and write the report of everything under ``run_dir``."""
    from harness.bench.report import write_report
    from harness.bench.results import find_runs

    runs = find_runs([run_dir])[0]
    FAILED_RUNS.extend((str(r.path), r.metadata.get("reason", "")) for r in runs if r.status == "failed")
    if runs and config.report:  # a run that stopped at a user error wrote nothing to report
        path = write_report([run_dir], Path(config.report_dir) if config.report_dir else run_dir)
        print(f"report: {path}", file=sys.stderr)


def _is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or user_error_in(e) is not None


def _interrupted_message() -> str:
    where = SWEEP.get("dir")
    if where is None:
        return "interrupted: finished runs keep their results (summarize them with `harness report DIR`)"
    return (f"interrupted: the finished runs in {where} keep their results; `harness report {where}` summarizes them, "
            "and the same command with resume=true runs the rest")


def _report_error(e: BaseException, show_tracebacks: bool) -> int:
    """One line naming the problem, and the exit status: 2 for a user error (whose empty run folders go), else 1."""
    _close_progress()
    user = _is_user_error(e)
    if user:
        _remove_stopped_runs()
    if show_tracebacks:
        raise e
    if user:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"error: {describe_error(e)} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
    return EXIT_FAILED


def _restore_logging(handlers: list[logging.Handler], level: int) -> None:
    root = logging.getLogger()
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def run_app(argv: list[str]) -> int:
    """Run the Hydra app on ``argv`` (overrides and Hydra flags); the exit status."""
    show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved_argv, saved_stderr = sys.argv, sys.stderr
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we print one line (or the traceback if the user asked)
    sys.argv = [saved_argv[0] if saved_argv else "harness", *argv]
    sys.stderr = Console(saved_stderr)
    root = logging.getLogger()
    saved_logging = (list(root.handlers), root.level)  # Hydra configures logging for its jobs; called in-process, undo it
    for state in (FAILED_RUNS, _NEW_DIRS, _STOPPED):
        state.clear()
    SWEEP.clear()
    try:
        _main()
    except sweep.SweepRefused as refused:
        assert refused.__cause__ is not None
        return _report_error(refused.__cause__, show_tracebacks)
    except KeyboardInterrupt:
        _close_progress()
        print(_interrupted_message(), file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help and friends
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        return _report_error(e, show_tracebacks)
    finally:
        _close_progress()
        KEEPER.close()  # a finished or stopped sweep gives its kept engine back (atexit does in a launcher's workers)
        _restore_logging(*saved_logging)
        sys.argv, sys.stderr = saved_argv, saved_stderr
        if not show_tracebacks:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if FAILED_RUNS:
        where, reason = FAILED_RUNS[0]
        print(f"error: {len(FAILED_RUNS)} run(s) failed; the first, {where}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0
