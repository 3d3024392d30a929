"""Results as data: the tidy tables of one run, written beside its metadata, and read back.

A run directory holds ``run`` (one row: the run's parameters and headline figures),
``requests`` (one row per sample) and ``kv_steps`` (one row per engine step), each as
Parquet and CSV (the CSV of ``requests`` leaves out the per-token times, a list column),
and ``metadata.json``. ``metadata.json`` is written last and atomically: a directory
without it is an unfinished run, which readers skip, so an interrupted sweep leaves its
finished runs readable.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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


def write_run(job_dir: Path, run: dict[str, Any], metadata: dict[str, Any],
              requests: pd.DataFrame | None = None, kv_steps: pd.DataFrame | None = None) -> None:
    """Write the tables, then ``metadata.json`` (whose presence marks the run finished)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (("run", pd.DataFrame([run])), ("requests", requests), ("kv_steps", kv_steps)):
        if table is None:
            continue
        table.to_parquet(job_dir / f"{name}.parquet", index=False)
        table.drop(columns=[c for c in table.columns if c.endswith("token_times_s")]).to_csv(job_dir / f"{name}.csv", index=False)
    tmp = job_dir / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(_jsonable({**metadata, "run": run}), indent=2))
    os.replace(tmp, job_dir / METADATA)


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
    """Finished runs under ``paths`` (a run or a sweep directory), and the run directories left unfinished."""
    runs, unfinished = [], []
    for root in map(Path, paths):
        for meta in sorted(root.rglob(METADATA)):
            runs.append(RunDir(meta.parent, json.loads(meta.read_text())))
        for hydra_dir in sorted(root.rglob(".hydra")):
            if not (hydra_dir.parent / METADATA).is_file():
                unfinished.append(hydra_dir.parent)
    return runs, unfinished


def runs_table(runs: list[RunDir]) -> pd.DataFrame:
    """One row per run, in run order, with the directory it came from."""
    return pd.DataFrame([{**r.run, "run_dir": str(r.path)} for r in runs])
