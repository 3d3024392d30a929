"""The highest request rate a system sustains: the reading of the vLLM paper's Fig. 12, by one stated rule.

The paper plots normalized latency (mean E2E / output length, s/token) against the request
rate and reads off where each system's latency explodes: past its capacity its queue grows
for the whole run. The rule here (``saturation`` in the config, docs/methodology.md):

- the unloaded latency ``L0`` of a workload is the lowest median (over repeats) normalized
  latency of any system at the lowest rate that every system ran;
- a system sustains a rate while its normalized latency stays within ``sustain_factor x L0``;
- its sustainable rate, in one repeat, is where its curve first crosses that limit, linearly
  interpolated between the last rate within it and the first beyond it. A point skipped as
  saturated (harness.bench.saturation) lies beyond it. A curve that never crosses gives only a lower
  bound (its highest rate), one that starts beyond it an upper bound (its lowest rate); the
  table says which.

Only complete repeats count: a repeat whose curve stops below the highest rate its series
reached in any repeat (a sweep cut short, to be resumed) says nothing about where its curve
crosses, and is left out by ``complete_repeats``.

The figure is the median over repeats with a bootstrap interval (harness.bench.stats), and the ratio
of two systems the ratio of their medians, each group resampled alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.bench.stats import Estimate, median_ci

LATENCY = "norm_latency_mean"


@dataclass(frozen=True)
class Crossing:
    """One repeat's sustainable rate; ``bound`` is '' (a crossing), '>=' (never crossed) or '<' (crossed at once)."""

    rate: float
    bound: str = ""


def complete_repeats(runs: pd.DataFrame, series: str = "system") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs of complete repeats, one row per incomplete (series, repeat) with the rate it stopped at)."""
    reached = runs.groupby([series, "repeat"])["rate"].transform("max")
    top = runs.groupby(series)["rate"].transform("max")
    complete = np.isclose(reached, top)
    cut = runs[~complete].groupby([series, "repeat"], as_index=False)["rate"].max()
    return runs[complete], cut


def unloaded_latency(runs: pd.DataFrame, series: str = "system") -> tuple[float, float]:
    """(L0, the rate it was read at): the lowest median latency of any series at the lowest rate all series ran."""
    ok = runs[runs["status"] == "ok"]
    rates = ok.groupby(series)["rate"].apply(lambda r: set(np.round(r, 9)))
    common = sorted(set.intersection(*rates)) if len(rates) else []
    if not common:
        return math.nan, math.nan
    low = common[0]
    at = ok[np.isclose(ok["rate"], low)]
    return float(at.groupby(series)[LATENCY].median().min()), float(low)


def crossing(curve: pd.DataFrame, limit: float) -> Crossing:
    """Where one repeat's curve (rate, latency, status; skipped = beyond the limit) first exceeds ``limit``."""
    curve = curve.sort_values("rate")
    previous = None
    for _, p in curve.iterrows():
        beyond = p["status"] == "skipped" or (p["status"] == "ok" and p[LATENCY] > limit)
        if p["status"] not in ("ok", "skipped"):
            continue
        if beyond:
            if previous is None:
                return Crossing(float(p["rate"]), "<")
            if p["status"] == "skipped":  # the rule skips only after a point beyond the limit: a last resort
                return Crossing(float(previous["rate"]))
            r1, l1, r2, l2 = previous["rate"], previous[LATENCY], p["rate"], p[LATENCY]
            return Crossing(float(r1 + (limit - l1) / (l2 - l1) * (r2 - r1)))
        previous = p
    return Crossing(float(previous["rate"]), ">=") if previous is not None else Crossing(math.nan)


@dataclass(frozen=True)
class Sustained:
    """A system's sustainable rate over the repeats, and whether any repeat gave only a bound."""

    estimate: Estimate
    per_repeat: tuple[float, ...]
    bound: str  # '' when every repeat crossed; else the bound of the repeats that did not


def sustainable_rates(runs: pd.DataFrame, limit: float, series: str = "system") -> dict[str, Sustained]:
    """Each series' sustainable rate (median over repeats, interval) under ``limit`` s/token."""
    out = {}
    for name, g in runs.groupby(series, sort=False):
        crossings = [crossing(c, limit) for _, c in g.groupby("repeat")]
        values = tuple(c.rate for c in crossings)
        bounds = {c.bound for c in crossings} - {""}
        out[str(name)] = Sustained(median_ci(values), values, "/".join(sorted(bounds)))
    return out
