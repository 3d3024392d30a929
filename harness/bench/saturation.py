"""Skipping the rates a system has already shown it cannot sustain (``saturation.skip_factor``).

Past its capacity a system's queue grows for the whole run, so a run at a higher rate only
takes longer (its requests drain at the capacity) and shows a higher latency still. With
``saturation.skip_factor`` set, a job of a sweep is skipped (status ``skipped``, the reason naming
the run that showed it) when a finished run of the same sweep, with the same repeat and the
same settings but a lower value of ``saturation.along``, had a mean normalized latency above
``skip_factor`` times the lowest of that series' runs at lower values. The rule reads only
finished runs, so jobs run in parallel by a launcher are never skipped on a guess. With
``skip_factor`` at least ``sustain_factor`` (the report's rule, harness.bench.sustain) the point that
triggers a skip is itself beyond the report's limit (a series' lowest latency is at least the
unloaded one), so the sustainable rate lies below every skipped point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.bench.results import RunDir, find_runs
from harness.bench.schema import SaturationSpec
from harness.bench.sustain import LATENCY


def _series_key(params: dict[str, Any], along: str) -> str:
    return repr(sorted((k, str(v)) for k, v in params.items() if k != along))


def _value(params: dict[str, Any], along: str) -> float | None:
    try:
        return float(params[along])
    except (KeyError, TypeError, ValueError):
        return None


def saturated(spec: SaturationSpec, params: dict[str, Any], repeat: int, sweep_dir: Path) -> str | None:
    """Why this job need not run (a lower value of its series already saturated), or None."""
    here = _value(params, spec.along)
    if spec.skip_factor is None or here is None:
        return None
    key = _series_key(params, spec.along)
    lower: list[tuple[float, float, RunDir]] = []
    for run in find_runs([sweep_dir])[0]:
        theirs = run.metadata.get("params", {})
        value = _value(theirs, spec.along)
        if (run.status != "ok" or run.metadata.get("repeat", 0) != repeat or value is None or value >= here
                or _series_key(theirs, spec.along) != key):
            continue
        latency = run.run.get(LATENCY)
        if latency is not None and math.isfinite(latency):
            lower.append((value, float(latency), run))
    if not lower:
        return None
    floor = min(latency for _, latency, _ in lower)
    for value, latency, run in sorted(lower, key=lambda x: x[0]):
        if latency > spec.skip_factor * floor:
            return (f"saturated: at {spec.along}={value:g} ({run.path.name}) the mean normalized latency was "
                    f"{latency:.4g} s/token, above {spec.skip_factor:g} x {floor:.4g} (the series' lowest)")
    return None
