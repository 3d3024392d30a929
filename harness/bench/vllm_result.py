"""A run as ``vllm bench serve --save-result`` writes one, both ways: our run written as that JSON (what its users'
scripts and dashboards read), and such a JSON made elsewhere read as a run row (``harness report`` draws it beside
ours).

Built from our own tables (the run row and the per-sample table), so each figure keeps the
definition docs/methodology.md gives it; the field names and units are vLLM's (seconds for
the per-request lists, milliseconds for the statistics, requests and tokens per second for
throughput). Statistics are over the successful requests, as vLLM computes them; failed ones
are counted in ``errors``. ITLs are the gaps between a request's deliveries (a chunk that
brings several tokens is one delivery), as vLLM measures between the chunks it receives.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pandas as pd

from harness.bench.metrics import delivery_times

VLLM_RESULT = "vllm_result.json"  # beside the run's own tables
PERCENTILES = (99,)  # vLLM's default --metric-percentiles
METRICS = ("ttft", "tpot", "itl", "e2el")


def _stats(name: str, seconds: np.ndarray) -> dict[str, float]:
    ms = seconds[np.isfinite(seconds)] * 1e3
    if ms.size == 0:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"std_{name}_ms": 0.0,
                **{f"p{p}_{name}_ms": 0.0 for p in PERCENTILES}}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)), f"std_{name}_ms": float(ms.std()),
            **{f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}}


def vllm_result(run: dict[str, Any], requests: pd.DataFrame, *, backend: str, model_id: str, tokenizer_id: str,
                when: dt.datetime | None = None) -> dict[str, Any]:
    """The JSON of one run: ``run`` is its row (harness.bench.metrics.summarize's figures and the parameters), ``requests``
    its per-sample table (harness.bench.metrics.request_table)."""
    ok = requests[requests["error"].isna() & (requests["finish_reason"] != "abort")]
    duration = float(run["duration_s"])
    itls = [np.diff(delivery_times(t)).tolist() for t in ok["token_times_s"]]
    rate = run.get("rate")
    total_in, total_out = int(ok["prompt_tokens"].sum()), int(ok["output_tokens"].sum())
    result = {
        "date": (when or dt.datetime.now()).strftime("%Y%m%d-%H%M%S"),
        "backend": backend, "model_id": model_id, "tokenizer_id": tokenizer_id,
        "num_prompts": int(run["num_requests"]),
        "request_rate": "inf" if rate is None or (isinstance(rate, float) and not math.isfinite(rate)) else float(rate),
        "burstiness": float(run.get("burstiness") or 1.0),
        "max_concurrency": None if run.get("arrival") != "closed" else int(run["concurrency"]),
        "duration": duration, "completed": len(ok), "failed": int(len(requests) - len(ok)),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "request_goodput": float(run.get("goodput_req_s", math.nan)),
        "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
        "max_concurrent_requests": int(run["max_in_flight"]) if run.get("max_in_flight") is not None else None,
        "input_lens": ok["prompt_tokens"].astype(int).tolist(), "output_lens": ok["output_tokens"].astype(int).tolist(),
        "ttfts": ok["ttft_s"].astype(float).tolist(), "itls": itls,
        "generated_texts": ["" for _ in range(len(ok))],  # the texts are not kept (kvbench measures, it does not store)
        "errors": ["" if pd.isna(e) else str(e) for e in requests["error"]],
    }
    seconds = {"ttft": ok["ttft_s"], "tpot": ok["tpot_s"], "e2el": ok["e2e_s"]}
    for name in METRICS:
        values = np.concatenate(itls) if name == "itl" and itls else np.asarray(seconds.get(name, []), dtype=float)
        result.update(_stats(name, np.asarray(values, dtype=float)))
    return result


# what a JSON must hold to be read as a `vllm bench serve` result
RESULT_KEYS = ("duration", "completed", "output_throughput", "mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms")
# our latency columns and vLLM's metric names
LATENCY_NAMES = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2el"}


def is_vllm_result(value: Any) -> bool:
    return isinstance(value, dict) and all(k in value for k in RESULT_KEYS)


def run_row(result: dict[str, Any], name: str) -> dict[str, Any]:
    """A `vllm bench serve` result as a run row with our column names (seconds, tokens/s); what it does not hold
    (p90/p95 unless it was asked for them, the KV memory, the hardware) is missing, not guessed."""
    rate = result.get("request_rate")
    concurrency = result.get("max_concurrency")
    row: dict[str, Any] = {
        "experiment": "vllm bench serve", "engine": "vllm", "engine_label": f"vllm:{name}", "status": "ok",
        "model": result.get("model_id"), "workload": "vllm bench serve", "workload_label": name,
        "arrival": "closed" if concurrency else "poisson", "concurrency": concurrency,
        "rate": rate if isinstance(rate, (int, float)) and math.isfinite(rate) else None,
        "burstiness": result.get("burstiness"), "repeat": 0, "kv_breakdown": False,
        "hardware": "unknown (a vllm bench serve result)", "duration_s": float(result["duration"]),
        "num_requests": result.get("num_prompts"), "completed": int(result["completed"]),
        "failed": result.get("failed"), "prompt_tokens": result.get("total_input_tokens"),
        "output_tokens": result.get("total_output_tokens"), "output_tok_s": float(result["output_throughput"]),
        "total_tok_s": result.get("total_token_throughput"), "requests_s": result.get("request_throughput"),
        "goodput_req_s": result.get("request_goodput", result.get("request_goodput:")),
        "max_in_flight": result.get("max_concurrent_requests"),
    }
    for ours, theirs in LATENCY_NAMES.items():
        ms = {"mean": result.get(f"mean_{theirs}_ms"), "p50": result.get(f"median_{theirs}_ms")}
        ms.update({f"p{p}": result.get(f"p{p}_{theirs}_ms") for p in (90, 95, 99)})
        row.update({f"{ours}_{k}": (v / 1e3 if isinstance(v, (int, float)) else math.nan) for k, v in ms.items()})
    return row
