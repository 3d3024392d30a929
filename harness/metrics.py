"""Latency and throughput figures exactly as DESIGN.md defines them.

Per sample (one of a request's n; one per request when n = 1):
TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1), undefined
(NaN, left out of the statistics) for a one-token output; ITL = the gaps between consecutive
tokens (pooled over all samples); E2E = finish - arrival; queue = first scheduled - arrival.
Each as mean, p50, p90, p95, p99 (linear interpolation between order statistics).
Throughput is over the measured window, from the first arrival to the last finish.
Goodput counts the requests whose every sample finished normally with TTFT and TPOT within
the SLOs (a sample without a TPOT meets any TPOT limit).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from harness.runner import RunRecord, SampleRecord

PERCENTILES = (50, 90, 95, 99)
FAILED = ("error", "abort")


def latency_stats(values: Iterable[float], name: str) -> dict[str, float]:
    """``{name}_mean``, ``{name}_p50`` ... ``{name}_p99`` over the finite values (NaN when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return {f"{name}_mean": math.nan, **{f"{name}_p{p}": math.nan for p in PERCENTILES}}
    return {f"{name}_mean": float(x.mean()), **{f"{name}_p{p}": float(np.percentile(x, p)) for p in PERCENTILES}}


def tpot(first_token: float, finish: float, output_tokens: int) -> float:
    return (finish - first_token) / (output_tokens - 1) if output_tokens >= 2 else math.nan


def _sample_row(s: SampleRecord, start: float) -> dict:
    nan = math.nan
    first = s.token_times[0] if s.token_times else None
    rel = (lambda t: t - start if t is not None else nan)
    return {
        "request_id": s.request_id, "sample": s.index, "prompt_tokens": s.prompt_tokens,
        "output_tokens": len(s.token_times), "cached_tokens": s.cached_tokens,
        "arrival_s": rel(s.arrival), "first_scheduled_s": rel(s.first_scheduled), "first_token_s": rel(first),
        "finish_s": rel(s.finish),
        "ttft_s": first - s.arrival if first is not None else nan,
        "tpot_s": tpot(first, s.finish, len(s.token_times)) if first is not None and s.finish is not None else nan,
        "e2e_s": s.finish - s.arrival if s.finish is not None else nan,
        "queue_s": s.first_scheduled - s.arrival if s.first_scheduled is not None else nan,
        "finish_reason": s.finish_reason, "error": s.error,
        "token_times_s": [t - start for t in s.token_times],
    }


def request_table(record: RunRecord) -> pd.DataFrame:
    """One row per sample; ``token_times_s`` keeps every token's time (seconds from the start)."""
    return pd.DataFrame([_sample_row(s, record.start) for s in record.samples])


def inter_token_latencies(table: pd.DataFrame) -> np.ndarray:
    gaps = [np.diff(np.asarray(t, dtype=float)) for t in table["token_times_s"] if len(t) > 1]
    return np.concatenate(gaps) if gaps else np.empty(0)


def goodput_requests(table: pd.DataFrame, ttft_slo: float | None, tpot_slo: float | None) -> int:
    """Requests whose every sample finished normally within the TTFT and TPOT limits."""
    ok = table["finish_reason"].notna() & ~table["finish_reason"].isin(FAILED)
    if ttft_slo is not None:
        ok &= table["ttft_s"] <= ttft_slo
    if tpot_slo is not None:
        ok &= table["tpot_s"].isna() | (table["tpot_s"] <= tpot_slo)
    return int(ok.groupby(table["request_id"]).all().sum())


def summarize(table: pd.DataFrame, duration: float, ttft_slo: float | None, tpot_slo: float | None) -> dict[str, float]:
    """The run's headline figures from its per-sample table and the length of its measured window."""
    by_request = table.groupby("request_id")
    done = table["finish_reason"].notna() & ~table["finish_reason"].isin(FAILED)
    completed = int(done.groupby(table["request_id"]).all().sum())
    output_tokens = int(table["output_tokens"].sum())
    prompt_tokens = int(by_request["prompt_tokens"].first().sum())  # the n samples share one prompt
    rate = (lambda x: x / duration if duration > 0 else math.nan)
    out: dict[str, float] = {
        "duration_s": duration, "num_requests": int(by_request.ngroups), "completed": completed,
        "failed": int(by_request.ngroups) - completed, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "output_tok_s": rate(output_tokens), "total_tok_s": rate(output_tokens + prompt_tokens),
        "requests_s": rate(completed), "goodput_req_s": rate(goodput_requests(table, ttft_slo, tpot_slo)),
        "slo_ttft_s": math.nan if ttft_slo is None else ttft_slo, "slo_tpot_s": math.nan if tpot_slo is None else tpot_slo,
    }
    for name in ("ttft", "tpot", "e2e", "queue"):
        out.update(latency_stats(table[f"{name}_s"], name))
    out.update(latency_stats(inter_token_latencies(table), "itl"))
    return out
