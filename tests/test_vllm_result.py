"""A run as `vllm bench serve --save-result` writes one, on a table made by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.bench.vllm_result import vllm_result

REQUESTS = pd.DataFrame({
    "prompt_tokens": [10, 20, 30], "output_tokens": [3, 4, 0],
    "ttft_s": [0.1, 0.2, math.nan], "tpot_s": [0.05, 0.1, math.nan], "e2e_s": [0.2, 0.5, 1.0],
    # the second request got two tokens in one delivery (one ITL gap covers them)
    "token_times_s": [[1.1, 1.15, 1.2], [2.2, 2.4, 2.4, 2.5], []],
    "finish_reason": ["length", "length", "error"], "error": [None, None, "HTTP 500"],
})
RUN = {"duration_s": 4.0, "num_requests": 3, "rate": None, "burstiness": 1.0, "arrival": "closed", "concurrency": 2,
       "goodput_req_s": 0.5, "max_in_flight": 2}


def test_statistics_are_over_the_successful_requests_and_itls_over_deliveries():
    r = vllm_result(RUN, REQUESTS, backend="openai", model_id="m", tokenizer_id="t")
    assert r["completed"] == 2 and r["failed"] == 1 and r["errors"] == ["", "", "HTTP 500"]
    assert r["total_input_tokens"] == 30 and r["total_output_tokens"] == 7 and r["output_throughput"] == 7 / 4.0
    assert r["request_rate"] == "inf" and r["max_concurrency"] == 2 and r["request_throughput"] == 0.5
    assert np.allclose(r["itls"][0], [0.05, 0.05]) and np.allclose(r["itls"][1], [0.2, 0.1])
    assert math.isclose(r["mean_ttft_ms"], 150.0) and math.isclose(r["median_tpot_ms"], 75.0)
    assert math.isclose(r["mean_itl_ms"], 100.0) and math.isclose(r["mean_e2el_ms"], 350.0)
    assert math.isclose(r["p99_e2el_ms"], 1e3 * np.percentile([0.2, 0.5], 99))


def test_an_open_loop_run_has_its_rate_and_no_concurrency_cap():
    r = vllm_result({**RUN, "rate": 4.0, "arrival": "poisson"}, REQUESTS, backend="openai-chat", model_id="m",
                    tokenizer_id="t")
    assert r["request_rate"] == 4.0 and r["max_concurrency"] is None and r["backend"] == "openai-chat"


def test_an_offline_run_saves_the_vllm_format_too(tmp_path, tiny_model):
    """One pipeline: save_vllm_result is a setting of any run, not only of bench-serve's."""
    import json

    from harness.bench.app import run_app

    tiny_model("tiny-qwen3")
    run_dir = tmp_path / "run"
    assert run_app(["+experiment=smoke", "engine=paged", "workload.num_requests=3", "workload.output.value=4",
                    "save_vllm_result=true", f"hydra.run.dir={run_dir}"]) == 0
    result = json.loads((run_dir / "vllm_result.json").read_text())
    run = pd.read_parquet(run_dir / "run.parquet").iloc[0]
    assert result["backend"] == "kvbench:paged" and result["model_id"] == "tiny-qwen3"
    assert result["completed"] == run["completed"] == 3 and result["output_throughput"] == run["output_tok_s"]
    assert "param.save_vllm_result" not in run.index  # how a run is written, not what it measures
