"""KV memory split as in the vLLM paper (Kwon et al., SOSP 2023, section 3 and Fig. 2), in token slots.

The data is the engine's KV log (engines.kv.accounting): its counters sampled after every
step's admissions, and every change of a sequence's allocation. At each sample, for the
sequences holding memory, each owning ``a`` slots of which ``s`` hold its K/V, and whose
final length ``L`` is known once the run is over:

- token states: slots holding a token's K/V (the engine's counter; a shared block once);
- internal fragmentation: allocated slots the sequence will never fill, ``max(0, a - L)``
  summed over the sequences (``s <= L`` always: see ``final_lengths``);
- reservation: allocated slots it will still fill, the rest of what is allocated and not
  holding token states: ``allocated - token states - internal``;
- external fragmentation: free slots that cannot serve the demand waiting at the head of
  the queue (the engine's counter: free slots in holes smaller than that request's region;
  0 for paging and when nothing waits).

``L`` is the most slots a sequence ever filled: prompt + output - 1 for a finished sample
(the last sampled token's K/V is never written), or more if the engine logged storing more.
Figures over a run are time-weighted means over its window: each sample holds until the next.
Engines without a breakdown (the transformers baselines) get NaN for its four parts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from engines.base import KVStats
from engines.kv.accounting import KVLog
from harness.bench.runner import SampleRecord

COMPONENTS = ("token_states", "reservation", "internal", "external")
# Cumulative engine counters: a run's table counts them from the start of its log.
CUMULATIVE = {"preemptions": "num_preemptions", "swapped_out": "num_swapped_out",
              "prefix_cache_queries": "prefix_cache_queries", "prefix_cache_hits": "prefix_cache_hits"}
STEP_COLUMNS = ("step", "t_s", "capacity", *COMPONENTS, "allocated", "free", "largest_free_extent", "cached",
                "num_running", "num_waiting", *CUMULATIVE)


def final_lengths(samples: Sequence[SampleRecord], log: KVLog) -> dict[tuple[str, int], int]:
    """Slots each sequence fills by its end: prompt + output - 1, or the most the engine ever logged stored."""
    lengths = {(s.request_id, s.index): s.prompt_tokens + max(len(s.token_times) - 1, 0) for s in samples}
    for a in log.allocations:
        key = (a.request_id, a.index)
        lengths[key] = max(lengths.get(key, 0), a.stored)
    return lengths


def internal_per_sample(log: KVLog, steps: np.ndarray, final_len: dict[tuple[str, int], int]) -> np.ndarray:
    """Internal fragmentation at each sample: every allocation holds ``max(0, a - L)`` from the
    sample that first shows it until the one that shows the sequence's next change."""
    internal = np.zeros(len(steps) + 1)
    if not log.allocations or not len(steps):
        return internal[:-1]
    ev = pd.DataFrame(log.allocations)
    keys = list(zip(ev["request_id"], ev["index"]))
    lengths = np.array([final_len.get(k, 0) for k in keys], dtype=float)
    until = ev.groupby(["request_id", "index"], sort=False)["step"].shift(-1).fillna(steps[-1] + 1)
    excess = np.maximum(ev["allocated"].to_numpy(dtype=float) - lengths, 0.0)
    np.add.at(internal, np.searchsorted(steps, ev["step"].to_numpy()), excess)
    np.add.at(internal, np.searchsorted(steps, until.to_numpy()), -excess)
    return np.cumsum(internal)[:-1]


def kv_steps(log: KVLog, samples: Sequence[SampleRecord], start: float) -> pd.DataFrame:
    """One row per sampled step: the breakdown, the raw counters, times in seconds from ``start``.

    Cumulative engine counters (preemptions, prefix-cache hits) count from ``log.baseline``,
    the engine's counters when the run began.
    """
    if not log.samples:
        return pd.DataFrame(columns=list(STEP_COLUMNS))
    stats: list[KVStats] = [s for _, _, s in log.samples]
    base = log.baseline or KVStats(0, 0, 0, 0, 0)
    table = pd.DataFrame({
        "step": [step for step, _, _ in log.samples], "t_s": [t - start for _, t, _ in log.samples],
        "capacity": [s.capacity for s in stats], "token_states": [s.stored for s in stats],
        "allocated": [s.allocated for s in stats], "free": [s.free for s in stats],
        "largest_free_extent": [s.largest_free_extent for s in stats], "external": [s.external for s in stats],
        "cached": [s.cached for s in stats], "num_running": [s.num_running for s in stats],
        "num_waiting": [s.num_waiting for s in stats],
        **{col: [getattr(s, attr) - getattr(base, attr) for s in stats] for col, attr in CUMULATIVE.items()},
    })
    if log.breakdown:
        internal = internal_per_sample(log, table["step"].to_numpy(), final_lengths(samples, log))
        table["internal"] = internal
        table["reservation"] = table["allocated"] - table["token_states"] - internal
    else:
        table[list(COMPONENTS)] = math.nan
    return table[list(STEP_COLUMNS)]


def time_weighted_mean(times: np.ndarray, values: np.ndarray, start: float, end: float) -> float:
    """Mean over [start, end] of the step function that holds ``values[k]`` from ``times[k]`` to ``times[k+1]``
    (and 0 before the first sample: nothing is held before the first step's admissions)."""
    if end <= start or len(times) == 0:
        return float("nan")
    edges = np.clip(np.append(times, end), start, end)
    weights = np.diff(edges)
    return float(np.dot(weights, values) / (end - start))


def summarize(steps: pd.DataFrame, duration: float, breakdown: bool) -> dict[str, float]:
    """Time-weighted means over the measured window, and the paper's fractions.

    Fractions of the capacity C: fragmentation = (internal + external) / C,
    waste = (reservation + internal + external) / C. ``*_used`` fractions divide by the
    memory in use (token states + reservation + fragmentation) instead: the paper's Fig. 2
    percentages, comparable whether or not the pool was full.
    """
    times = steps["t_s"].to_numpy(dtype=float)
    mean = {c: time_weighted_mean(times, steps[c].to_numpy(dtype=float), 0.0, duration) for c in ("allocated", *COMPONENTS)}
    # the pool is there from the start, before the first step's admissions are sampled
    mean["capacity"] = time_weighted_mean(np.minimum(times, np.r_[0.0, times[1:]]), steps["capacity"].to_numpy(dtype=float),
                                          0.0, duration)
    out: dict[str, float] = {"kv_breakdown": breakdown,
                             **{f"kv_mean_{c}": mean[c] for c in ("capacity", "allocated", *COMPONENTS)}}
    capacity = mean["capacity"]
    share = (lambda x, whole: x / whole if whole > 0 else math.nan)
    used = sum(mean[c] for c in COMPONENTS)
    for c in COMPONENTS:
        out[f"kv_{c}_frac"] = share(mean[c], capacity)
        out[f"kv_{c}_used_frac"] = share(mean[c], used)
    out["kv_fragmentation"] = share(mean["internal"] + mean["external"], capacity)
    out["kv_waste"] = share(mean["reservation"] + mean["internal"] + mean["external"], capacity)
    sized = steps[steps["capacity"] > 0]
    out["kv_peak_allocated_frac"] = float((sized["allocated"] / sized["capacity"]).max()) if len(sized) else math.nan
    out.update(step_counts(steps))
    return out


def step_counts(steps: pd.DataFrame) -> dict[str, float]:
    """The most sequences running at once and their mean over steps (the vLLM paper's Fig. 13, "requests batched":
    one value per engine step, each step's batch after its admissions), preemptions, and the prefix cache's hit rate."""
    if steps.empty:
        return {"max_running": math.nan, "mean_running": math.nan, "preemptions": math.nan, "prefix_cache_hit_rate": math.nan}
    last = steps.iloc[-1]
    queries = last["prefix_cache_queries"]
    return {"max_running": int(steps["num_running"].max()), "mean_running": float(steps["num_running"].mean()),
            "preemptions": int(last["preemptions"]),
            "prefix_cache_hit_rate": last["prefix_cache_hits"] / queries if queries else math.nan}
