"""`harness bench-serve` against our own server on loopback: the same tables and report as an offline run."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from engines.config import PagedConfig
from harness import cli
from harness.bench.app import job_params, task_config
from harness.bench.http.kv_poller import kv_from_metrics
from harness.bench.schema import register_configs
from harness.common.config import compose
from harness.serve.config import ServerConfig

ENGINE = dict(num_kv_slots=16384, max_model_len=512)
OVERRIDES = ["+experiment=smoke", "workload.num_requests=6", "arrival.concurrency=3"]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(PagedConfig(**ENGINE), ServerConfig())


@pytest.fixture(scope="module")
def http_run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "http"
    code = cli.main(["bench-serve", "--base-url", server.base_url + "/v1", "--model", "tiny-qwen3", "--out", str(out),
                     "--kv-poll-interval", "0.02", *OVERRIDES])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def offline_run(tiny_model, tmp_path_factory):
    from omegaconf import OmegaConf

    from harness.bench.job import JobSpec, execute
    from harness.bench.report import write_report

    register_configs()
    cfg = task_config(compose("config", OVERRIDES, job_name="offline"))
    typed = {name: OmegaConf.to_object(cfg[name]) for name in ("model", "workload", "arrival", "slo")}
    spec = JobSpec(name=cfg.name, seed=cfg.seed, engine_label="paged", engine=PagedConfig(**ENGINE), **typed,
                   warmup_requests=cfg.warmup_requests, params=job_params(OVERRIDES),
                   config=OmegaConf.to_container(cfg, resolve=True))
    out = tmp_path_factory.mktemp("bench") / "offline"
    assert execute(spec, out) == "ok"
    write_report([out], out)
    return out


@pytest.mark.parametrize("table", ["run", "requests", "kv_steps"])
def test_same_columns_as_an_offline_run(http_run, offline_run, table):
    http = pd.read_parquet(http_run / f"{table}.parquet")
    offline = pd.read_parquet(offline_run / f"{table}.parquet")
    assert list(http.columns) == list(offline.columns)
    if table == "run":
        assert list(pd.read_csv(http_run / "run.csv").columns) == list(pd.read_csv(offline_run / "run.csv").columns)


def test_the_http_figures_are_measured(http_run, offline_run):
    run = pd.read_parquet(http_run / "run.parquet").iloc[0]
    offline = pd.read_parquet(offline_run / "run.parquet").iloc[0]
    assert run["status"] == "ok" and run["engine"] == "paged" and run["engine_label"] == "paged@http"
    for key in ("num_requests", "completed", "prompt_tokens", "output_tokens", "model", "device", "workload_label",
                "engine.num_kv_slots", "engine.block_size"):
        assert run[key] == offline[key], key
    assert run["completed"] == 6 and run["output_tokens"] == 6 * 8 and run["failed"] == 0
    for key in ("ttft_p95", "tpot_p95", "itl_p95", "e2e_p95", "output_tok_s", "total_tok_s", "requests_s"):
        assert run[key] > 0 and math.isfinite(run[key]), key
    assert run["ttft_mean"] <= run["e2e_mean"]
    assert math.isnan(run["queue_p95"])  # not visible over HTTP
    # the KV breakdown comes from the server's per-sequence snapshots
    assert run["kv_mean_capacity"] == 16384
    assert 0 < run["kv_token_states_frac"] < 1 and run["max_running"] >= 2
    requests = pd.read_parquet(http_run / "requests.parquet")
    assert sorted(requests["request_id"]) == sorted(str(i) for i in range(6))
    assert (requests["output_tokens"] == 8).all() and (requests["finish_reason"] == "length").all()
    assert all(len(t) == 8 and list(t) == sorted(t) for t in requests["token_times_s"])
    assert (requests["ttft_s"] > 0).all() and requests["error"].isna().all()
    # how busy the client itself was during the run (a saturated client limits what it measures)
    metadata = json.loads((http_run / "metadata.json").read_text())
    assert 0 < metadata["client_cpu_util"] < 4


def test_the_report_is_written_like_an_offline_one(http_run, offline_run):
    for run_dir in (http_run, offline_run):
        assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()
    http_md = (http_run / "report.md").read_text()
    offline_md = (offline_run / "report.md").read_text()
    header = [line for line in http_md.splitlines() if line.startswith("| engine")]
    assert header and header == [line for line in offline_md.splitlines() if line.startswith("| engine")]
    figures = sorted(p.name for p in (http_run / "figures").iterdir())
    assert figures == sorted(p.name for p in (offline_run / "figures").iterdir())
    assert "paged@http" in http_md


def test_one_report_over_both_runs(http_run, offline_run, tmp_path):
    assert cli.main(["report", str(http_run), str(offline_run), "--out", str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(runs["engine_label"]) == ["paged", "paged@http"]


def test_kv_from_vllm_metrics_text():
    text = "\n".join([
        '# TYPE vllm:kv_cache_usage_perc gauge',
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
        '# TYPE vllm:num_requests_running gauge',
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        '# TYPE vllm:num_requests_waiting gauge',
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
        '# TYPE vllm:cache_config_info gauge',
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",model_name="m"} 1.0',
        '# TYPE vllm:prefix_cache_hits counter',
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 64.0',
        '# TYPE vllm:prefix_cache_queries counter',
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 128.0',
        "",
    ])
    s = kv_from_metrics(text, "m")
    assert (s.capacity, s.allocated, s.free, s.num_running, s.num_waiting) == (16000, 4000, 12000, 3, 2)
    assert (s.prefix_cache_hits, s.prefix_cache_queries) == (64, 128)


def test_kv_from_our_metrics_text(server):
    import httpx

    s = kv_from_metrics(httpx.get(server.base_url + "/metrics").text, "tiny-qwen3")
    assert s.capacity == 16384 and s.allocated == 0


def test_unreachable_server_is_a_user_error(capsys):
    assert cli.main(["bench-serve", "--base-url", "http://127.0.0.1:9", "+experiment=smoke"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_unknown_model_name_is_a_user_error(server, capsys):
    assert cli.main(["bench-serve", "--base-url", server.base_url, "--model", "nope", "+experiment=smoke"]) == 2
    assert "serves tiny-qwen3" in capsys.readouterr().err


def test_a_sweep_runs_every_point_and_reports_over_the_axis(server, tmp_path):
    out = tmp_path / "sweep"
    code = cli.main(["bench-serve", "--base-url", server.base_url, "--out", str(out), "--kv-poll-interval", "0.005",
                     "+experiment=smoke", "workload.num_requests=4", "workload.output.value=16", "arrival.concurrency=1,4"])
    assert code == 0
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["param.arrival.concurrency"]) == [1, 4]
    assert sorted(runs["concurrency"]) == [1, 4]
    assert (runs["completed"] == 4).all()
    assert runs.set_index("concurrency").loc[4, "max_running"] > 1
    assert (out / "figures" / "throughput_latency_vs_arrival_concurrency.png").is_file()


def test_kv_from_metrics_alone_leaves_the_breakdown_empty(server, offline_run, tmp_path):
    """What a run against another server (vLLM) records: KV usage from /metrics, no per-sequence breakdown."""
    out = tmp_path / "metrics"
    # long enough (6 x 96 tokens) that scrapes every 5 ms see memory in use, on a busy 2-core machine too
    assert cli.main(["bench-serve", "--base-url", server.base_url, "--out", str(out), "--kv-source", "metrics",
                     "--kv-poll-interval", "0.005", *OVERRIDES, "workload.output.value=96"]) == 0
    run = pd.read_parquet(out / "run.parquet").iloc[0]
    columns = (lambda d: [c for c in pd.read_parquet(d / "run.parquet").columns if not c.startswith("param.")])
    assert columns(out) == columns(offline_run)
    assert run["kv_peak_allocated_frac"] > 0 and run["kv_mean_allocated"] > 0
    assert (out / "report.md").is_file()
    assert math.isnan(run["kv_token_states_frac"]) and math.isnan(run["kv_waste"])
    steps = pd.read_parquet(out / "kv_steps.parquet")
    assert (steps["capacity"] == 16384).all()
    assert steps["token_states"].isna().all() and (steps["allocated"] > 0).any()


@pytest.fixture(scope="module")
def stray_kvbench(tiny_model):
    """Our server, with its /kvbench routes answering as other servers' catch-all routes do: `{}` for every one
    (``all``), or only for the KV counters and log while /kvbench/info is real (``log``)."""
    from fastapi.responses import JSONResponse
    from starlette.middleware.base import BaseHTTPMiddleware

    from engines import create_engine
    from harness.serve.app import create_app
    from harness.serve.engine_loop import EngineLoop
    from harness.serve.lifecycle import ServerThread

    servers = {}
    for mode in ("all", "log"):
        model_dir = tiny_model("tiny-qwen3")
        app = create_app(EngineLoop(create_engine(model_dir, PagedConfig(**ENGINE))), model_dir=model_dir,
                         served_names=["tiny-qwen3"], cfg=ServerConfig())

        async def stray(request, call_next, mode=mode):
            path = request.url.path
            if path.startswith("/kvbench/") and (mode == "all" or path != "/kvbench/info"):
                return JSONResponse({})
            return await call_next(request)
        app.add_middleware(BaseHTTPMiddleware, dispatch=stray)
        servers[mode] = ServerThread(app).start()
    yield servers
    for s in servers.values():
        s.stop()


@pytest.mark.parametrize("mode", ["all", "log"])
def test_a_server_whose_kvbench_routes_answer_something_else_still_gets_its_run_written(stray_kvbench, mode, tmp_path):
    out = tmp_path / mode
    assert cli.main(["bench-serve", "--base-url", stray_kvbench[mode].base_url, "--model", "tiny-qwen3",
                     "--out", str(out), "--kv-poll-interval", "0.02", *OVERRIDES]) == 0
    run = pd.read_parquet(out / "run.parquet").iloc[0]
    assert run["status"] == "ok" and run["completed"] == 6 and (out / "report.md").is_file()
    assert math.isnan(run["kv_token_states_frac"])  # no KV log to split: no breakdown, and no crash at the end


def test_save_result_writes_what_vllm_bench_serve_writes(server, tmp_path):
    """The fields of `vllm bench serve --save-result`, from the same tables as our own figures."""
    import numpy as np

    out = tmp_path / "saved"
    assert cli.main(["bench-serve", "--base-url", server.base_url, "--model", "tiny-qwen3", "--out", str(out),
                     "--save-result", *OVERRIDES]) == 0
    result = json.loads((out / "vllm_result.json").read_text())
    run = pd.read_parquet(out / "run.parquet").iloc[0]
    requests = pd.read_parquet(out / "requests.parquet")
    for key in ("date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
                "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput", "total_token_throughput", "input_lens",
                "output_lens", "ttfts", "itls", "generated_texts", "errors",
                *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99"))):
        assert key in result, key
    assert result["backend"] == "openai" and result["model_id"] == "tiny-qwen3" and result["max_concurrency"] == 3
    assert result["completed"] == run["completed"] == 6 and result["num_prompts"] == 6
    assert result["duration"] == pytest.approx(run["duration_s"])
    assert result["output_throughput"] == pytest.approx(run["output_tok_s"])
    assert result["mean_ttft_ms"] == pytest.approx(1e3 * run["ttft_mean"])
    assert result["p99_tpot_ms"] == pytest.approx(1e3 * np.percentile(requests["tpot_s"].dropna(), 99))
    assert result["output_lens"] == requests["output_tokens"].tolist() and len(result["itls"]) == 6
    gaps = np.concatenate([np.diff(np.unique(t)) for t in requests["token_times_s"]])
    assert result["p99_itl_ms"] == pytest.approx(1e3 * np.percentile(gaps, 99))
    assert result["errors"] == [""] * 6


@pytest.fixture(scope="module")
def strings_only(tiny_model):
    """Our server behind a front that refuses token-id prompts, as servers that take only strings do, and has no
    /kvbench routes (404, as a server that is not ours)."""
    from fastapi.responses import JSONResponse
    from starlette.middleware.base import BaseHTTPMiddleware

    from engines import create_engine
    from harness.serve.app import create_app
    from harness.serve.engine_loop import EngineLoop
    from harness.serve.lifecycle import ServerThread

    model_dir = tiny_model("tiny-qwen3")
    app = create_app(EngineLoop(create_engine(model_dir, PagedConfig(**ENGINE))), model_dir=model_dir,
                     served_names=["tiny-qwen3"], cfg=ServerConfig())

    async def strings(request, call_next):
        if request.url.path.startswith("/kvbench/"):
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if request.url.path == "/v1/completions" and not isinstance(json.loads(await request.body()).get("prompt"), str):
            return JSONResponse({"error": {"message": "prompt must be a string", "type": "invalid_request_error",
                                           "param": "prompt", "code": None}}, status_code=400)
        return await call_next(request)
    app.add_middleware(BaseHTTPMiddleware, dispatch=strings)
    server = ServerThread(app).start()
    yield server
    server.stop()


def test_a_server_that_takes_only_text_gets_text_prompts_and_the_true_lengths_from_usage(strings_only, tmp_path):
    out = tmp_path / "auto"
    assert cli.main(["bench-serve", "--base-url", strings_only.base_url, "--model", "tiny-qwen3", "--out", str(out),
                     *OVERRIDES]) == 0
    run = pd.read_parquet(out / "run.parquet").iloc[0]
    assert run["completed"] == 6 and run["failed"] == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["server"]["prompt_format"] == "text" and meta["server"]["kv_source"] == "metrics"
    assert (out / "report.md").is_file() and run["kv_peak_allocated_frac"] >= 0
    requests = pd.read_parquet(out / "requests.parquet")
    assert (requests["prompt_tokens"] > 0).all()  # the server's count of the text it was sent
    out = tmp_path / "ids"  # asked for token ids anyway: every request fails (exit 1), and the run says so
    assert cli.main(["bench-serve", "--base-url", strings_only.base_url, "--model", "tiny-qwen3", "--out", str(out),
                     "--prompt-format", "token-ids", *OVERRIDES]) == 1
    run = pd.read_parquet(out / "run.parquet").iloc[0]
    assert run["failed"] == 6 and run["completed"] == 0


def test_report_draws_a_vllm_bench_serve_result_beside_our_runs(server, tmp_path):
    """A JSON written by `vllm bench serve --save-result` elsewhere (here: ours, in the same format) as a series."""
    ours = tmp_path / "ours"
    assert cli.main(["bench-serve", "--base-url", server.base_url, "--model", "tiny-qwen3", "--out", str(ours),
                     "--save-result", *OVERRIDES]) == 0
    elsewhere = tmp_path / "elsewhere" / "vllm-0.11-h100.json"
    elsewhere.parent.mkdir()
    result = json.loads((ours / "vllm_result.json").read_text())
    elsewhere.write_text(json.dumps({**result, "output_throughput": 1234.5, "median_ttft_ms": 42.0}))
    out = tmp_path / "report"
    assert cli.main(["report", str(ours), str(elsewhere), "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2  # our run once (its own vllm_result.json is the same run), and the file
    theirs = runs[runs["engine"] == "vllm"].iloc[0]
    assert theirs["engine_label"] == "vllm:vllm-0.11-h100" and theirs["output_tok_s"] == 1234.5
    assert theirs["ttft_p50"] == pytest.approx(0.042) and math.isnan(theirs["ttft_p95"])
    assert "vllm:vllm-0.11-h100" in (out / "report.md").read_text()
    folder = tmp_path / "folder_report"  # a folder of such files is searched like a sweep
    assert cli.main(["report", str(elsewhere.parent), "--out", str(folder)]) == 0
    assert len(pd.read_csv(folder / "runs.csv")) == 1


def test_an_engine_sweep_measures_the_servers_engine_once(server, tmp_path):
    """bench-serve is the Hydra app with engine=http: an experiment that sweeps engines runs its other axes only."""
    out = tmp_path / "engines"
    assert cli.main(["bench-serve", "--base-url", server.base_url, "--out", str(out), "+experiment=concurrency_sweep",
                     "arrival.concurrency=1,2", "workload.num_requests=2", "workload.prompt.value=8",
                     "workload.output.value=4"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["concurrency"]) == [1, 2] and set(runs["engine_label"]) == {"paged@http"}
    assert not [c for c in runs.columns if c == "param.engine" or c.startswith("param.engine.")]


def test_the_api_key_is_sent_and_never_recorded(start_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    keyed = start_server(PagedConfig(**ENGINE), ServerConfig(api_key="sekrit-42"))
    out = tmp_path / "keyed"
    assert cli.main(["bench-serve", "--base-url", keyed.base_url, "--model", "tiny-qwen3", "--out", str(out),
                     "--api-key", "sekrit-42", *OVERRIDES]) == 0
    assert pd.read_parquet(out / "run.parquet").iloc[0]["completed"] == 6
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".csv", ".log", ".md")]
    assert written and not [p for p in written if "sekrit-42" in p.read_text(errors="replace")]


def test_an_engine_named_on_the_command_line_is_left_out(server, tmp_path, caplog):
    """The workload of an offline run, `engine=paged` included, runs against the server unchanged."""
    out = tmp_path / "named"
    assert cli.main(["bench-serve", "--base-url", server.base_url, "--out", str(out), *OVERRIDES, "engine=paged"]) == 0
    assert pd.read_parquet(out / "run.parquet").iloc[0]["engine_label"] == "paged@http"
    assert "the server's engine is fixed: engine=paged is left out" in caplog.text
