"""KV memory split as in the vLLM paper (Kwon et al., SOSP 2023, section 3 and Fig. 2), in token slots.

At each sampled instant, for every sequence holding memory (stored s, allocated a) whose
final length L is known once the run is over:
- token states: slots holding a token's K/V (the engine's ``stored``);
- reservation: allocated slots the sequence will still fill, ``max(0, min(a, L) - s)``;
- internal fragmentation: allocated slots it will never fill, ``max(0, a - max(s, L))``;
- external fragmentation: free slots no allocation can use because they are not contiguous,
  ``free - largest_free_extent`` (0 for a paged pool).
Per sequence, s + reservation + internal = a whenever s <= L (the usual case).

L is the sequence's prompt plus output minus one (the last sampled token's K/V is never
written), or more if the engine reported storing more. Figures over a run are
time-weighted means: each sample's value holds until the next sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from harness.runner import KVSample, SampleRecord

COMPONENTS = ("token_states", "reservation", "internal", "external")


@dataclass(frozen=True)
class Breakdown:
    capacity: int
    token_states: int
    reservation: int
    internal: int
    external: int


def final_lengths(samples: Sequence[SampleRecord], kv: Sequence[KVSample]) -> dict[tuple[str, int], int]:
    """Slots each sequence fills by its end: prompt + output - 1, or the most the engine ever reported stored."""
    lengths = {(s.request_id, s.index): s.prompt_tokens + max(len(s.token_times) - 1, 0) for s in samples}
    for sample in kv:
        for key, (stored, _) in sample.stats.sequences.items():
            lengths[key] = max(lengths.get(key, 0), stored)
    return lengths


def breakdown(sample: KVSample, final_len: Mapping[tuple[str, int], int]) -> Breakdown:
    reservation = internal = 0
    for key, (stored, allocated) in sample.stats.sequences.items():
        final = final_len.get(key, stored)
        reservation += max(0, min(allocated, final) - stored)
        internal += max(0, allocated - max(stored, final))
    s = sample.stats
    return Breakdown(s.capacity, s.stored, reservation, internal, s.free - s.largest_free_extent)


def kv_steps(kv: Sequence[KVSample], samples: Sequence[SampleRecord], start: float) -> pd.DataFrame:
    """One row per sampled step: the breakdown, the raw counters, times in seconds from ``start``.

    Cumulative engine counters (preemptions, prefix-cache hits) are relative to the first sample.
    """
    final_len = final_lengths(samples, kv)
    base = kv[0].stats
    rows = []
    for sample in kv:
        b, s = breakdown(sample, final_len), sample.stats
        rows.append({
            "t_s": sample.time - start, "capacity": b.capacity, "token_states": b.token_states,
            "reservation": b.reservation, "internal": b.internal, "external": b.external,
            "allocated": s.allocated, "free": s.free, "largest_free_extent": s.largest_free_extent, "cached": s.cached,
            "num_running": s.num_running, "num_waiting": s.num_waiting,
            "preemptions": s.num_preemptions - base.num_preemptions,
            "swapped_out": s.num_swapped_out - base.num_swapped_out,
            "prefix_cache_queries": s.prefix_cache_queries - base.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits - base.prefix_cache_hits,
        })
    return pd.DataFrame(rows)


def time_weighted_mean(times: np.ndarray, values: np.ndarray, start: float, end: float) -> float:
    """Mean over [start, end] of the step function that holds ``values[k]`` from ``times[k]`` to ``times[k+1]``."""
    if end <= start or len(times) == 0:
        return float("nan")
    edges = np.clip(np.append(times, end), start, end)
    weights = np.diff(edges)
    return float(np.dot(weights, values) / (end - start))


def summarize(steps: pd.DataFrame, duration: float) -> dict[str, float]:
    """Time-weighted means over the measured window, and the paper's fractions.

    Fractions of the capacity C (DESIGN.md): fragmentation = (internal + external) / C,
    waste = (reservation + internal + external) / C. ``*_used`` fractions divide by the
    memory in use (token states + reservation + fragmentation) instead: the paper's Fig. 2
    percentages, comparable whether or not the pool was full.
    """
    times = steps["t_s"].to_numpy(dtype=float)
    mean = {c: time_weighted_mean(times, steps[c].to_numpy(dtype=float), 0.0, duration)
            for c in ("capacity", "allocated", *COMPONENTS)}
    out = {f"kv_mean_{c}": v for c, v in mean.items()}
    capacity = mean["capacity"]
    used = sum(mean[c] for c in COMPONENTS)
    for c in COMPONENTS:
        out[f"kv_{c}_frac"] = mean[c] / capacity if capacity > 0 else float("nan")
        out[f"kv_{c}_used_frac"] = mean[c] / used if used > 0 else float("nan")
    out["kv_fragmentation"] = (mean["internal"] + mean["external"]) / capacity if capacity > 0 else float("nan")
    out["kv_waste"] = (mean["reservation"] + mean["internal"] + mean["external"]) / capacity if capacity > 0 else float("nan")
    sized = steps[steps["capacity"] > 0]
    out["kv_peak_allocated_frac"] = float((sized["allocated"] / sized["capacity"]).max()) if len(sized) else float("nan")
    return out
