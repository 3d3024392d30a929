"""Where a run's step time went: the step anatomy's columns of the per-step table and its run totals.

The engine times each step (engines.step_clock): host wall time by phase, and the GPU's
time from the forward's first kernel to the sampler's last by CUDA events. Here those become columns of the per-step
table (``kv_steps``, joined on the step number) and figures of the run row. Definitions:
docs/methodology.md, "Step anatomy".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from engines.kv.accounting import KVLog
from engines.step_clock import HOST_PHASES

HOST_COLUMNS = tuple(f"{p}_s" for p in HOST_PHASES)
TIME_COLUMNS = ("step_s", *HOST_COLUMNS, "gpu_s")
RUN_COLUMNS = ("num_steps", "step_ms", *(f"step_{p}_ms" for p in HOST_PHASES), "step_gpu_ms", "host_ms_per_step",
               "gpu_busy_frac", "in_step_frac")


def with_times(steps: pd.DataFrame, log: KVLog) -> pd.DataFrame:
    """The per-step table with the anatomy's columns (seconds; NaN for a step the engine did not time)."""
    if steps.empty or not log.times:
        return steps.reindex(columns=[*steps.columns, *TIME_COLUMNS])
    times = pd.DataFrame(
        [(t.wall, *(getattr(t, p) for p in HOST_PHASES), t.gpu) for t in log.times],
        columns=list(TIME_COLUMNS), index=pd.Index([t.step for t in log.times], name="step"), dtype=float,
    )
    return steps.join(times[~times.index.duplicated(keep="last")], on="step")


def summarize(steps: pd.DataFrame, duration: float) -> dict[str, float]:
    """Means per timed step, the GPU's busy share of the run's window and the share spent inside steps."""
    timed = steps[steps["step_s"].notna()] if "step_s" in steps else steps.iloc[:0]
    if timed.empty or duration <= 0:
        return dict.fromkeys(RUN_COLUMNS, math.nan)
    ms = lambda col: float(timed[col].mean() * 1e3)  # noqa: E731
    gpu = timed["gpu_s"]
    return {
        "num_steps": int(len(timed)),
        "step_ms": ms("step_s"),
        **{f"step_{p}_ms": ms(f"{p}_s") for p in HOST_PHASES},
        "step_gpu_ms": float(gpu.mean() * 1e3),
        "host_ms_per_step": float((timed["step_s"] - timed["sync_s"]).mean() * 1e3),
        "gpu_busy_frac": float(gpu.sum(min_count=1) / duration),
        "in_step_frac": float(np.sum(timed["step_s"].to_numpy()) / duration),
    }
