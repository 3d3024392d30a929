"""When each request is sent, as seconds after the start of a run.

Open-loop processes fix every arrival in advance (offline: all at 0; Poisson or gamma
inter-arrival gaps at a rate; a replayed trace), so a slow engine builds a queue as a real
server would. A closed loop has no schedule: each of ``concurrency`` clients sends its
next request when its previous one finishes, which the runner does as it goes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np

from harness.bench.schema import ArrivalSpec, WorkloadSpec
from harness.common.errors import UserError


def gamma_gaps(rate: float, burstiness: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaps with mean 1/rate and squared coefficient of variation 1/burstiness (shape 1 is Poisson)."""
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def read_trace(path: str | Path) -> np.ndarray:
    """Arrival times from a file: one number a line, or JSONL objects with "timestamp" (or "arrival_time")."""
    times = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
            if isinstance(value, dict):
                value = value.get("timestamp", value.get("arrival_time"))
            times.append(float(value))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise UserError(f"arrival.trace: {path} line {number} is not a time in seconds") from e
    return np.asarray(times, dtype=float)


def timed_plan(arrival: ArrivalSpec, workload: WorkloadSpec, mean_output: float) -> tuple[ArrivalSpec, WorkloadSpec]:
    """The rate a ``load`` asks for (load / mean output length), and the requests a ``window`` holds (rate x window).

    The returned arrival keeps its load beside the rate it resolved to (a config may set only one of them)."""
    if arrival.load is not None:
        arrival = copy.copy(arrival)
        arrival.rate = arrival.load / mean_output
    if arrival.window is not None:
        workload = dataclasses.replace(workload, num_requests=max(1, round(arrival.rate * arrival.window)))
    return arrival, workload


def arrival_offsets(spec: ArrivalSpec, n: int, seed: int) -> np.ndarray | None:
    """Seconds after the start at which each of ``n`` requests arrives; None for a closed loop."""
    rng = np.random.default_rng([seed, 4])  # a stream of its own (the workload uses 0..3)
    if spec.process == "closed":
        return None
    if spec.process == "offline":
        return np.zeros(n)
    if spec.process == "trace":
        times = np.sort(read_trace(spec.trace))
        if len(times) < n:
            raise UserError(f"arrival.trace: {spec.trace} has {len(times)} arrivals, workload.num_requests is {n}")
        return times[:n] - times[0]
    burstiness = 1.0 if spec.process == "poisson" else spec.burstiness
    # The first request arrives at 0, each later one one gap after the one before.
    return np.concatenate([[0.0], np.cumsum(gamma_gaps(spec.rate, burstiness, n - 1, rng))])
