"""Medians over repeats with 95% bootstrap intervals, and ratios of two groups' medians.

Percentile bootstrap (scipy.stats.bootstrap, ``method="percentile"``) with a fixed seed, so
that a report regenerated from the same runs shows the same intervals. With so few repeats
(typically 3) the interval of a median is the range of the values: a resampled median is the
smallest value with probability 7/27 > 2.5%, so both tails land on the extremes. The ratio
resamples each group independently (the runs are not paired).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its interval; the bounds are NaN when there is no interval (one value)."""

    value: float
    low: float = math.nan
    high: float = math.nan

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies inside the interval (False without one)."""
        return self.has_interval and self.low <= x <= self.high


NAN = Estimate(math.nan)


def _clean(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values), dtype=float)
    return a[~np.isnan(a)]


def _median_ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def _median(a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(a, axis=axis)


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, confidence: float, seed: int) -> tuple[float, float]:
    result = stats.bootstrap(samples, statistic, vectorized=True, paired=False, method="percentile",
                             confidence_level=confidence, n_resamples=N_RESAMPLES, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def median_ci(values: Iterable[float], confidence: float = CONFIDENCE, seed: int = SEED) -> Estimate:
    """The median of ``values`` (NaNs dropped) with its percentile-bootstrap interval."""
    a = _clean(values)
    if len(a) == 0:
        return NAN
    m = float(np.median(a))
    if len(a) == 1:
        return Estimate(m)
    if np.all(a == a[0]):
        return Estimate(m, m, m)
    return Estimate(m, *_bootstrap((a,), _median, confidence, seed))


def ratio_ci(numerator: Iterable[float], denominator: Iterable[float], confidence: float = CONFIDENCE,
             seed: int = SEED) -> Estimate:
    """median(numerator) / median(denominator), each group resampled independently for the interval.

    No interval when either group has a single value; NaN when the denominator's median is 0.
    """
    a, b = _clean(numerator), _clean(denominator)
    if len(a) == 0 or len(b) == 0 or np.median(b) == 0:
        return NAN
    r = float(np.median(a) / np.median(b))
    if len(a) == 1 or len(b) == 1:
        return Estimate(r)
    if np.all(a == a[0]) and np.all(b == b[0]):
        return Estimate(r, r, r)
    if np.any(b == 0):  # a resampled denominator of 0 would make the ratio infinite
        return Estimate(r)
    return Estimate(r, *_bootstrap((a, b), _median_ratio, confidence, seed))
