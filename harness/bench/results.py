"""Results as data: the tidy tables of one run, written beside its metadata, and read back.

A run directory holds ``run`` (one row: the run's parameters and headline figures),
``requests`` (one row per sample) and ``kv_steps`` (one row per engine step), each as
Parquet and CSV (the CSV of ``requests`` leaves out the per-token times, a list column),
and ``metadata.json``. Every file is written to a temporary name and renamed into place, and
``metadata.json`` goes last (and first out, when a run is written again): a directory without it
is an unfinished run, which readers skip, so a sweep killed at any moment (even by SIGKILL)
leaves each run either complete or recognisably unfinished.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

METADATA = "metadata.json"
TABLES = ("run", "requests", "kv_steps")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` to a temporary sibling, then rename: ``path`` is never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON (non-finite numbers as null), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(value), indent=2)
    _write_atomically(path, lambda f: f.write_text(text))


def write_run(job_dir: Path, run: dict[str, Any], metadata: dict[str, Any],
              requests: pd.DataFrame | None = None, kv_steps: pd.DataFrame | None = None) -> None:
    """Write the tables, then ``metadata.json`` (whose presence marks the run finished).

    A run written again (a resumed sweep re-running a failed run) first loses its
    ``metadata.json``, then any table of the old run that this one does not write.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / METADATA).unlink(missing_ok=True)
    tables = {"run": pd.DataFrame([run]), "requests": requests, "kv_steps": kv_steps}
    for name, table in tables.items():
        if table is None:
            for suffix in ("parquet", "csv"):
                (job_dir / f"{name}.{suffix}").unlink(missing_ok=True)
            continue
        text = table.drop(columns=[c for c in table.columns if c.endswith("token_times_s")])
        _write_atomically(job_dir / f"{name}.parquet", lambda f, t=table: t.to_parquet(f, index=False))
        _write_atomically(job_dir / f"{name}.csv", lambda f, t=text: t.to_csv(f, index=False))
    record = json.dumps(_jsonable({**metadata, "run": run}), indent=2)
    _write_atomically(job_dir / METADATA, lambda f: f.write_text(record))


@dataclass
class RunDir:
    """A finished run directory: its metadata, its one-row summary, and its tables on demand."""

    path: Path
    metadata: dict[str, Any]

    @property
    def status(self) -> str:
        return self.metadata.get("status", "unknown")

    @property
    def run(self) -> dict[str, Any]:
        return self.metadata["run"]

    def table(self, name: str) -> pd.DataFrame:
        file = self.path / f"{name}.parquet"
        return pd.read_parquet(file) if file.is_file() else pd.DataFrame()


def find_runs(paths: Iterable[str | Path]) -> tuple[list[RunDir], list[Path]]:
    """Finished runs under ``paths`` (a run or a sweep directory), and the run directories left unfinished.

    ``vllm bench serve --save-result`` JSON files count as runs too: given as paths, or found in folders that are
    not our runs' (ours write one beside their tables, which is the same run)."""
    from harness.bench.vllm_result import is_vllm_result, run_row

    runs, unfinished = [], []
    for root in map(Path, paths):
        files = [root] if root.is_file() else [f for f in sorted(root.rglob("*.json"), key=run_order)
                                              if f.name != METADATA and not (f.parent / METADATA).is_file()]
        for file in files:
            try:
                result = json.loads(file.read_text())
            except (OSError, ValueError, RecursionError):
                continue
            if is_vllm_result(result):
                runs.append(RunDir(file, {"status": "ok", "run": run_row(result, file.stem)}))
        if root.is_file():
            continue
        for meta in sorted(root.rglob(METADATA), key=run_order):
            runs.append(RunDir(meta.parent, json.loads(meta.read_text())))
        for hydra_dir in sorted(root.rglob(".hydra"), key=run_order):
            if not (hydra_dir.parent / METADATA).is_file():
                unfinished.append(hydra_dir.parent)
    return runs, unfinished


def run_order(path: Path) -> list[Any]:
    """Sort key in sweep order: numbers compare as numbers, so job 2's ``2_...`` precedes job 10's ``10_...``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def runs_table(runs: list[RunDir]) -> pd.DataFrame:
    """One row per run, in run order, with the directory it came from."""
    return pd.DataFrame([{**r.run, "run_dir": str(r.path)} for r in runs])
