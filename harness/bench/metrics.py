"""Latency and throughput figures as vLLM's ``bench serve`` defines them (docs/methodology.md).

Per sample (one of a request's n; one per request when n = 1), times on one clock:
- TTFT = first delivery - arrival; E2E = finish (the last delivery) - arrival;
- TPOT = (E2E - TTFT) / (output tokens - 1), undefined (NaN) for a one-token output;
- ITL = the gaps between successive deliveries, each gap once: a delivery is the tokens
  that reached the host together (one step's, one multi-step call's, one stream chunk's),
  which share one timestamp, so a delivery of k tokens is one gap, not k - 1 zero gaps;
- queue = first scheduled - arrival;
- normalized latency = E2E / output tokens (s/token), the vLLM paper's Fig. 12 measure: its
  run figure is the mean over samples (``norm_latency_mean``), as the paper's.
Each as mean, p50, p90, p95, p99 (linear interpolation between order statistics).

Only successful samples count: finished, neither failed (error) nor aborted. Failed and
aborted requests are counted apart and their tokens are not throughput. Throughput is
over the measured window, from the run's start (the first arrival) to the last finish.
Goodput counts the successful requests whose every sample meets every given SLO (TTFT,
TPOT, E2E; a value equal to its limit meets it; a sample without a TPOT meets any TPOT limit).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from harness.bench.runner import RunRecord, SampleRecord

PERCENTILES = (50, 90, 95, 99)
FAILED = "error"
ABORTED = "abort"
LATENCIES = ("ttft", "tpot", "e2e", "queue", "norm_latency")


def latency_stats(values: Iterable[float], name: str) -> dict[str, float]:
    """``{name}_mean``, ``{name}_p50`` ... ``{name}_p99`` over the finite values (NaN when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return {f"{name}_mean": math.nan, **{f"{name}_p{p}": math.nan for p in PERCENTILES}}
    return {f"{name}_mean": float(x.mean()), **{f"{name}_p{p}": float(np.percentile(x, p)) for p in PERCENTILES}}


def tpot(ttft: float, e2e: float, output_tokens: int) -> float:
    return (e2e - ttft) / (output_tokens - 1) if output_tokens >= 2 else math.nan


def delivery_times(token_times: Iterable[float]) -> np.ndarray:
    """The distinct deliveries of a sample: its token times with each run of one timestamp kept once."""
    t = np.asarray(list(token_times), dtype=float)
    if t.size == 0:
        return t
    return t[np.r_[True, np.diff(t) != 0]]


def _sample_row(s: SampleRecord, start: float) -> dict:
    nan = math.nan
    first = s.token_times[0] if s.token_times else None
    rel = (lambda t: t - start if t is not None else nan)
    ttft = first - s.arrival if first is not None else nan
    e2e = s.finish - s.arrival if s.finish is not None else nan
    return {
        "request_id": s.request_id, "sample": s.index, "prompt_tokens": s.prompt_tokens,
        "output_tokens": len(s.token_times), "deliveries": len(delivery_times(s.token_times)),
        "cached_tokens": s.cached_tokens,
        "arrival_s": rel(s.arrival), "first_scheduled_s": rel(s.first_scheduled), "first_token_s": rel(first),
        "finish_s": rel(s.finish), "ttft_s": ttft, "tpot_s": tpot(ttft, e2e, len(s.token_times)), "e2e_s": e2e,
        "queue_s": s.first_scheduled - s.arrival if s.first_scheduled is not None else nan,
        "norm_latency_s": e2e / len(s.token_times) if s.token_times else nan,
        "finish_reason": s.finish_reason, "error": s.error, "token_times_s": [t - start for t in s.token_times],
    }


REQUEST_COLUMNS = ("request_id", "sample", "prompt_tokens", "output_tokens", "deliveries", "cached_tokens", "arrival_s",
                   "first_scheduled_s", "first_token_s", "finish_s", "ttft_s", "tpot_s", "e2e_s", "queue_s",
                   "norm_latency_s", "finish_reason", "error", "token_times_s")


def request_table(record: RunRecord) -> pd.DataFrame:
    """One row per sample; ``token_times_s`` keeps every token's time (seconds from the start)."""
    return pd.DataFrame([_sample_row(s, record.start) for s in record.samples], columns=list(REQUEST_COLUMNS))


def successful(table: pd.DataFrame) -> pd.Series:
    """Samples that finished normally: a finish reason that is neither an error nor an abort."""
    return table["finish_reason"].notna() & ~table["finish_reason"].isin((FAILED, ABORTED))


def inter_token_latencies(table: pd.DataFrame) -> np.ndarray:
    """Gaps between successive deliveries of every sample in ``table``, pooled."""
    gaps = [np.diff(delivery_times(t)) for t in table["token_times_s"]]
    gaps = [g for g in gaps if g.size]
    return np.concatenate(gaps) if gaps else np.empty(0)


def goodput_requests(table: pd.DataFrame, ttft_slo: float | None, tpot_slo: float | None,
                     e2e_slo: float | None = None) -> int:
    """Successful requests whose every sample meets every given SLO."""
    ok = successful(table)
    if ttft_slo is not None:
        ok &= table["ttft_s"] <= ttft_slo
    if tpot_slo is not None:
        ok &= table["tpot_s"].isna() | (table["tpot_s"] <= tpot_slo)
    if e2e_slo is not None:
        ok &= table["e2e_s"] <= e2e_slo
    return int(ok.groupby(table["request_id"]).all().sum())


def request_outcomes(table: pd.DataFrame) -> dict[str, int]:
    """Requests completed (every sample successful), failed (a sample errored or never finished), aborted (the rest)."""
    by_request = table.groupby("request_id")
    completed = successful(table).groupby(table["request_id"]).all()
    aborted = (table["finish_reason"] == ABORTED).groupby(table["request_id"]).any() & ~completed
    return {"num_requests": int(by_request.ngroups), "completed": int(completed.sum()), "aborted": int(aborted.sum()),
            "failed": int(by_request.ngroups - completed.sum() - aborted.sum())}


def summarize(table: pd.DataFrame, duration: float, ttft_slo: float | None, tpot_slo: float | None,
              e2e_slo: float | None = None) -> dict[str, float]:
    """The run's headline figures from its per-sample table and the length of its measured window."""
    good = table[successful(table)]
    output_tokens = int(good["output_tokens"].sum())
    prompt_tokens = int(good.groupby("request_id")["prompt_tokens"].first().sum())  # the n samples share one prompt
    rate = (lambda x: x / duration if duration > 0 else math.nan)
    outcomes = request_outcomes(table)
    slo = (lambda v: math.nan if v is None else v)
    out: dict[str, float] = {
        "duration_s": duration, **outcomes, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "output_tok_s": rate(output_tokens), "total_tok_s": rate(output_tokens + prompt_tokens),
        "requests_s": rate(outcomes["completed"]),
        "goodput_req_s": rate(goodput_requests(table, ttft_slo, tpot_slo, e2e_slo)),
        "slo_ttft_s": slo(ttft_slo), "slo_tpot_s": slo(tpot_slo), "slo_e2e_s": slo(e2e_slo),
    }
    for name in LATENCIES:
        out.update(latency_stats(good[f"{name}_s"], name))
    out.update(latency_stats(inter_token_latencies(good), "itl"))
    return out
