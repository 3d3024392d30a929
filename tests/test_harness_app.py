"""The Hydra app end to end, as users run it: `python -m harness ...` in a fresh directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.app import run_app
from harness.results import find_runs

SMOKE = ["+experiment=smoke", "workload.num_requests=4", "workload.output.value=4"]


def harness(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _model(tiny_model):
    tiny_model("tiny-qwen3")  # built once, before the subprocesses look for it


@pytest.mark.parametrize("args, needle", [
    (["engine=nope"], "unknown engine 'nope'; choose one of: contiguous"),
    (["engine.blok_size=16"], "unknown key 'engine.blok_size'; valid keys here: attn_implementation, batch_size, device"),
    (["engine=paged", "engine.blok_size=16"], "block_size, cpu_kv_budget_gb"),
    (["arrival=closed", "arrival.concurrency=-4"], "arrival.concurrency must be an integer >= 1, got -4"),
    (["workload=sharegpt", "workload.dataset.path=/no/such/sharegpt.json"], "file '/no/such/sharegpt.json' does not exist"),
    (["workload=sharegpt"], "workload.dataset.path needs a value"),
    (["+experiment=nope"], "unknown experiment 'nope'"),
    (["engine.batch_size=many"], "engine.batch_size: Value 'many'"),
])
def test_a_bad_override_is_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    assert run_app(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_the_console_script_exits_nonzero_on_a_bad_override(tmp_path):
    script = Path(sys.executable).with_name("harness")
    done = subprocess.run([str(script), "engine=nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: unknown engine 'nope'"), done.stderr


def test_smoke_run_writes_tables_metadata_and_report(tmp_path):
    done = harness([*SMOKE, "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    row = pd.read_parquet(run / "run.parquet").iloc[0]
    assert row["status"] == "ok" and row["engine"] == "hf" and row["completed"] == 4
    assert row["output_tokens"] == 16 and row["output_tok_s"] > 0 and row["ttft_p95"] > 0
    requests = pd.read_parquet(run / "requests.parquet")
    assert len(requests) == 4 and requests["output_tokens"].tolist() == [4] * 4
    assert all(len(t) == 4 for t in requests["token_times_s"])
    assert len(pd.read_parquet(run / "kv_steps.parquet")) > 4
    assert (run / "requests.csv").is_file() and (run / "kv_steps.csv").is_file()
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["status"] == "ok" and meta["git"]["commit"] and meta["versions"]["torch"]
    assert meta["model_shape"]["hidden_size"] == 64 and meta["config"]["engine"]["name"] == "hf"
    assert meta["hardware"]["device"] in ("cpu", "cuda")
    report = (run / "report.md").read_text()
    assert "![TTFT and TPOT distributions](figures/ttft_tpot_distributions.png)" in report
    assert (run / "figures" / "ttft_tpot_distributions.png").stat().st_size > 1000
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_multirun_through_the_submitit_launcher_aggregates_into_one_report(tmp_path):
    done = harness(["-m", *SMOKE, "hydra/launcher=submitit_local", "arrival.concurrency=1,2", "hydra.sweep.dir=sweep"], tmp_path)
    assert done.returncode == 0, done.stderr
    runs, unfinished = find_runs([tmp_path / "sweep"])
    assert sorted(r.run["concurrency"] for r in runs) == [1, 2] and not unfinished
    assert all(r.status == "ok" for r in runs)
    assert len(pd.read_csv(tmp_path / "sweep" / "runs.csv")) == 2
    assert (tmp_path / "sweep" / "figures" / "throughput_latency_vs_arrival_concurrency.png").is_file()


def test_engines_not_landed_are_skipped_and_failures_reported_while_the_sweep_goes_on(tmp_path):
    # Stand-ins, installed in the subprocess: paged has not landed; hf breaks on its first step.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import engines, engines.hf\n"
        "engines.ENGINE_CLASSES['paged'] = ('engines.not_landed_yet', 'PagedEngine')\n"
        "def broken(self):\n    raise RuntimeError('boom')\n"
        "engines.hf.HFEngine._step = broken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "harness", "-m", *SMOKE, "engine=hf,paged,contiguous", "hydra.sweep.dir=sweep"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: 1 run(s) failed; the first, ")
    assert "RuntimeError: boom" in done.stderr
    assert "skipped paged: engine 'paged' has not landed yet" in done.stdout + done.stderr
    status = {r.run["engine"]: r.status for r in find_runs([tmp_path / "sweep"])[0]}
    assert status == {"hf": "failed", "paged": "skipped", "contiguous": "ok"}
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "skipped: paged (1 runs): engine 'paged' has not landed yet" in report
    assert "failed: hf (1 runs): RuntimeError: boom" in report


def test_an_interrupted_sweep_leaves_finished_runs_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "harness", "-m", *SMOKE, "workload.num_requests=2,100000",
                             "hydra.sweep.dir=sweep"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not find_runs([tmp_path / "sweep"])[0] and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # the second, endless run is under way
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    runs, unfinished = find_runs([tmp_path / "sweep"])
    assert [r.run["num_requests"] for r in runs] == [2] and len(unfinished) == 1
    report = subprocess.run([sys.executable, "-m", "harness", "report", "sweep"], cwd=tmp_path, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "unfinished (no results)" in (tmp_path / "sweep" / "report.md").read_text()


def test_memory_waste_in_ci_size_ranks_the_reservation_policies(tmp_path):
    """The vLLM paper's Fig. 2 experiment, CPU-sized: paging holds the most token states and wastes
    almost nothing; an exact reservation has no internal fragmentation; max reserves the most."""
    done = harness(["+experiment=memory_waste", "workload.num_requests=48", "engine.num_kv_slots=4096",
                    "hydra.sweep.dir=sweep"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = pd.read_parquet(tmp_path / "sweep" / "runs.parquet").set_index("engine_label")
    share = runs["kv_token_states_used_frac"]
    assert share["paged"] > 0.9 and runs.loc["paged", "kv_waste"] < 0.05
    assert share["paged"] > share["contiguous_oracle"] > share["contiguous"]
    assert runs.loc["contiguous_oracle", "kv_internal_used_frac"] < 0.01
    assert runs.loc["contiguous", "kv_internal_used_frac"] > runs.loc["contiguous_pow2", "kv_internal_used_frac"]
    assert runs.loc["paged", "max_running"] > runs.loc["contiguous", "max_running"]
    assert (tmp_path / "sweep" / "figures" / "kv_breakdown.png").is_file()
