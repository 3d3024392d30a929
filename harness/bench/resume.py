"""Resuming a sweep (``resume=true``): which directory it continues, and which of its runs it keeps.

A run is kept only if it finished ``ok`` with the config that is asked for now (the keys of
``harness.bench.schema.NOT_MEASURED`` aside, which say how to run or report, not what is measured),
so a resumed sweep never mixes settings; unfinished, failed and skipped runs run again. A
finished run recorded with another config is a user error that names the keys that differ.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness.bench.results import METADATA, RunDir
from harness.bench.schema import NOT_MEASURED
from harness.common.errors import UserError

SHOWN_DIFFERENCES = 5


def output_dir(base: str, stamp: str, resume: bool) -> str:
    """The resolver of ``hydra.run.dir`` and ``hydra.sweep.dir``: ``base/stamp`` for a new run or sweep,
    the latest directory under ``base`` to resume (timestamps sort by name)."""
    if not resume:
        return f"{base}/{stamp}"
    earlier = sorted(p.name for p in Path(base).glob("*") if p.is_dir()) if Path(base).is_dir() else []
    if not earlier:
        raise UserError(f"resume=true: nothing to resume under {base}/ (or name the directory with hydra.sweep.dir=DIR)")
    return f"{base}/{earlier[-1]}"


def measured(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as recorded in metadata.json (JSON types), without the keys that do not change what it measures."""
    from harness.bench.results import _jsonable

    return json.loads(json.dumps(_jsonable({k: v for k, v in config.items() if k not in NOT_MEASURED})))


def differences(recorded: dict[str, Any], requested: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, each as ``key: recorded -> requested``."""
    out = []
    for key in sorted(set(recorded) | set(requested), key=str):
        a, b = recorded.get(key, "(absent)"), requested.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def job_number(path: Path) -> int | None:
    """The Hydra job number that prefixes a sweep's run directory (``12_engine=paged`` -> 12)."""
    match = re.match(r"(\d+)_", path.name)
    return int(match.group(1)) if match else None


def check_same_config(run: RunDir, requested: dict[str, Any]) -> None:
    """A finished run recorded with another config than the one requested is a user error naming the keys."""
    recorded = {k: v for k, v in run.metadata.get("config", {}).items() if k not in NOT_MEASURED}
    diff = differences(recorded, measured(requested))
    if diff:
        more = f" and {len(diff) - SHOWN_DIFFERENCES} more" if len(diff) > SHOWN_DIFFERENCES else ""
        raise UserError(f"resume=true: {run.path} finished with another config ({'; '.join(diff[:SHOWN_DIFFERENCES])}{more}); "
                        "resume with the settings it ran with, or start a new sweep")


def finished_run(job_dir: Path) -> RunDir | None:
    meta = job_dir / METADATA
    return RunDir(job_dir, json.loads(meta.read_text())) if meta.is_file() else None


def check_sweep(sweep_dir: Path, planned: dict[Path, dict[str, Any]]) -> None:
    """Before a resumed sweep runs anything: each finished run in ``sweep_dir`` is one the sweep asks for now
    (``planned``: every job's directory and config), recorded with that job's config."""
    by_number = {job_number(path): (path, config) for path, config in planned.items()}
    for path in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []:
        run = finished_run(path)
        if run is None:
            continue
        if path in planned:
            check_same_config(run, planned[path])
        elif job_number(path) in by_number:  # the same job, asked for with other overrides
            check_same_config(run, by_number[job_number(path)][1])
        else:
            raise UserError(f"resume=true: {path} is not a run of the sweep asked for now; resume with the settings "
                            "it ran with, or start a new sweep")


def reusable(job_dir: Path, requested: dict[str, Any]) -> bool:
    """Whether ``job_dir`` already holds this run, finished ok; a finished run of another config is a user error."""
    run = finished_run(job_dir)
    if run is None:
        return False
    check_same_config(run, requested)
    return run.status == "ok"
