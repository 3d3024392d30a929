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
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.bench import app, sweep
from harness.bench.app import CONF_DIR, engine_config, run_app
from harness.bench.results import find_runs, write_run
from harness.bench.resume import job_number
from harness.cli import main as cli_main

SMOKE = ["+experiment=smoke", "workload.num_requests=4", "workload.output.value=4"]
# prompt lengths drawn from the seed: equal for every engine within a repeat, different between repeats
VARIED_PROMPTS = ["workload.prompt.dist=uniform", "workload.prompt.low=4", "workload.prompt.high=64"]


def harness(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def with_site(tmp_path: Path, code: str) -> dict:
    """An environment whose Python runs ``code`` first (a sitecustomize): stand-ins for the app's subprocess."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def _model(tiny_model):
    tiny_model("tiny-qwen3")  # built once, before the subprocesses look for it


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the GPU workload")


@pytest.mark.parametrize("args, needle", [
    (["engine=nope"], "unknown engine 'nope'; choose one of: contiguous"),
    (["engine.blok_size=16"], "unknown key 'engine.blok_size'; valid keys here: attn_implementation, batch_size, device"),
    (["engine=paged", "engine.blok_size=16"], "block_size, cpu_kv_budget_gb"),
    (["arrival=closed", "arrival.concurrency=-4"], "arrival.concurrency must be an integer >= 1, got -4"),
    (["arrival=closed", "arrival.concurrency=0"], "arrival.concurrency must be an integer >= 1, got 0"),
    (["arrival.concurrency=1.5"], "arrival.concurrency: Value '1.5' of type 'float' could not be converted to Integer"),
    (["workload.num_requests=-1"], "workload.num_requests must be >= 1, got -1"),
    (["workload=sharegpt", "workload.dataset.path=/no/such/sharegpt.json"], "file '/no/such/sharegpt.json' does not exist"),
    (["workload=sharegpt"], "workload.dataset.path needs a value"),
    (["+experiment=nope"], "unknown experiment 'nope'"),
    (["engine.batch_size=many"], "engine.batch_size: Value 'many'"),
    (["engine=paged", "engine.block_size=0"], "engine paged: block_size must be a power of two in [1, 256], got 0"),
    (["torch_threads=0"], "torch_threads must be >= 1 (or null), got 0"),
    (["+engine_overrides.contiguous_pow2.reservation=max"],
     "engine_overrides: 'contiguous_pow2' is not an engine kind; the keys are engine kinds (engine.name), one of: contiguous, hf, hf_paged, paged"),
    (["repeats=0"], "repeats must be >= 1, got 0"),
    (["-m", "engine=hf,paged", "repeats=-1"], "repeats must be an integer >= 1, got -1"),
    (["-m", *SMOKE, "arrival.concurrency=2,0"], "arrival.concurrency must be an integer >= 1, got 0"),
    (["resume=true"], "resume=true: nothing to resume under outputs/default/"),
    (["-m", "engine=hf,paged", "resume=true"], "resume=true: nothing to resume under multirun/default/"),
    pytest.param(["+experiment=throughput"], "'throughput' is a GPU reference workload", marks=ON_CPU),
])
def test_a_user_error_is_one_line_exit_status_2_and_leaves_no_folder(in_process, capsys, args, needle):
    assert run_app(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not list(in_process.iterdir()), list(in_process.rglob("*"))  # no empty outputs/ or multirun/ folder left


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
    if not torch.cuda.is_available():  # a CPU computes in float32 whatever the checkpoint's dtype
        assert meta["compute_dtype"] == row["compute_dtype"] == "float32" and meta["model_shape"]["dtype"] == "bfloat16"
    assert row["seed"] == 0 and row["repeat"] == 0 and "param.repeat" not in row
    assert "Loading weights" not in done.stderr and "[HYDRA]" not in done.stdout + done.stderr  # silenced
    assert meta["model_shape"]["hidden_size"] == 64 and meta["config"]["engine"]["name"] == "hf"
    assert meta["hardware"]["device"] in ("cpu", "cuda")
    report = (run / "report.md").read_text()
    assert "![TTFT and TPOT distributions](figures/ttft_tpot_distributions.png)" in report
    assert (run / "figures" / "ttft_tpot_distributions.png").stat().st_size > 1000
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_transformers_continuous_batching_logs_nothing_below_a_warning(tmp_path):
    """It logs through a logger of its own (not transformers'), with its own console handler."""
    done = harness([*SMOKE, "engine=hf_paged", "hydra.run.dir=run", "report=false"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ContinuousBatchingLogger" not in done.stderr and "Loading weights" not in done.stderr, done.stderr


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
    env = with_site(tmp_path, "import engines, engines.hf\n"
                              "engines.ENGINE_CLASSES['paged'] = ('engines.not_landed_yet', 'PagedEngine')\n"
                              "def broken(self):\n    raise RuntimeError('boom')\n"
                              "engines.hf.HFEngine._step = broken\n")
    done = harness(["-m", *SMOKE, "engine=hf,paged,contiguous", "hydra.sweep.dir=sweep"], tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: 1 run(s) failed; the first, ")
    assert "RuntimeError: boom" in done.stderr
    assert "skipped paged: engine 'paged' has not landed yet" in done.stdout + done.stderr
    status = {r.run["engine"]: r.status for r in find_runs([tmp_path / "sweep"])[0]}
    assert status == {"hf": "failed", "paged": "skipped", "contiguous": "ok"}
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "skipped: paged (1 runs): engine 'paged' has not landed yet" in report
    assert "failed: hf (1 runs): RuntimeError: boom" in report
    # a person follows the sweep on one line per run start and finish (stderr is no terminal here)
    assert "run 2 of 3: engine=paged started" in done.stderr and "run 3 of 3: engine=contiguous ok in " in done.stderr
    assert "[HYDRA]" not in done.stdout + done.stderr and "Loading weights" not in done.stderr


def test_the_first_failed_run_is_the_first_in_job_order(tmp_path):
    for name in ("10_engine=paged", "2_engine=hf"):
        write_run(tmp_path / name, {"engine": name}, {"status": "failed", "reason": f"boom in {name}"})
    app.FAILED_RUNS.clear()
    app._finish(tmp_path, OmegaConf.create({"report": False, "report_dir": None}))
    assert [Path(where).name for where, _ in app.FAILED_RUNS] == ["2_engine=hf", "10_engine=paged"]
    app.FAILED_RUNS.clear()


@pytest.mark.parametrize("label, kind", [("contiguous_pow2", "contiguous"), ("contiguous", "contiguous"), ("paged", "paged")])
def test_engine_overrides_apply_to_every_engine_config_of_their_kind(label, kind):
    cfg = composed(["+experiment=throughput", f"engine={label}", "require_cuda=false"])
    engine = app.job_spec(app.task_config(cfg), cfg.hydra).engine  # as the sweep's check and the job build it
    assert engine == engine_config(cfg)
    assert engine.name == kind and engine.num_scheduler_steps == 8  # throughput's settings for contiguous and paged
    if label == "contiguous_pow2":
        assert engine.reservation == "pow2"


COMPARISONS = ["concurrency_sweep", "rate_sweep", "memory_waste", "kv_budget_sweep", "block_size_sweep",
               "parallel_sampling", "throughput", "seed_8b", "sliding_window"]


@pytest.mark.parametrize("experiment", COMPARISONS)
def test_experiments_that_compare_kv_strategies_run_paged_without_prefix_caching(experiment):
    cfg = composed([f"+experiment={experiment}", "engine=paged", "require_cuda=false"])
    assert engine_config(cfg).enable_prefix_caching is False


def test_prefix_caching_stays_on_where_it_is_the_subject():
    cfg = composed(["+experiment=prefix_sharing"])
    assert engine_config(cfg).enable_prefix_caching is True
    assert cfg.hydra.sweeper.params["engine.enable_prefix_caching"] == "true,false"


def test_the_main_job_sweeps_every_engine_and_every_reservation_policy():  # and every KV strategy
    cfg = composed(["+experiment=concurrency_sweep"])
    assert cfg.hydra.sweeper.params.engine.split(",") == [
        "hf", "hf_paged", "contiguous", "contiguous_pow2", "contiguous_oracle", "vattention", "paged"]


def test_the_sweep_plan_runs_repeats_as_the_outermost_dimension():
    """Hydra's basic sweeper orders the product by first appearance: config.yaml's `repeat` param comes first,
    then the experiment's params, then the command line's sweeps (sweep.jobs is the sweeper's own expansion)."""
    cfg = composed(["+experiment=concurrency_sweep", "repeats=3"])
    OmegaConf.update(cfg, "hydra.overrides.task", [*cfg.hydra.overrides.task, "workload.n=1,2"], force_add=True)
    plan = [dict(o.split("=", 1) for o in job) for job in sweep.jobs(cfg)]
    engines = ("hf", "hf_paged", "contiguous", "contiguous_pow2", "contiguous_oracle", "vattention", "paged")
    settings = len(engines) * 9 * 2  # engines x concurrencies x n
    assert len(plan) == 3 * settings
    assert [job["repeat"] for job in plan] == [str(r) for r in range(3) for _ in range(settings)]  # A B A B, not A A B B
    assert [job["engine"] for job in plan[:settings]] == [e for e in engines for _ in range(18)]
    assert [job["workload.n"] for job in plan[:4]] == ["1", "2", "1", "2"]
    assert plan[settings:2 * settings] == [{**job, "repeat": "1"} for job in plan[:settings]]


def test_repeats_interleave_in_a_sweep_each_drawing_its_workload_from_seed_plus_repeat(in_process, capsys):
    assert run_app(["-m", *SMOKE, *VARIED_PROMPTS, "engine=hf,contiguous", "repeats=2", "seed=5", "hydra.sweep.dir=sweep"]) == 0
    runs = find_runs([in_process / "sweep"])[0]
    order = [(job_number(r.path), r.run["engine"], r.run["repeat"], r.run["seed"]) for r in runs]
    assert order == [(0, "hf", 0, 5), (1, "contiguous", 0, 5), (2, "hf", 1, 6), (3, "contiguous", 1, 6)]
    prompts = [tuple(r.table("requests").sort_values("request_id")["prompt_tokens"]) for r in runs]
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    assert all("param.repeat" not in r.run for r in runs)  # the repeat is no sweep axis
    assert len({r.path for r in runs}) == 4
    err = capsys.readouterr().err
    assert "run 3 of 4: engine=hf repeat=1 started" in err and "run 4 of 4: engine=contiguous repeat=1 ok in " in err


def test_a_single_run_with_repeats_becomes_a_sweep_of_its_repeats(in_process):
    assert run_app([*SMOKE, "workload.num_requests=2", "repeats=3"]) == 0
    assert not (in_process / "outputs").exists()
    [sweep_dir] = (in_process / "multirun" / "smoke").iterdir()
    runs = find_runs([sweep_dir])[0]
    assert [(job_number(r.path), r.run["repeat"], r.run["seed"], r.status) for r in runs] == [(i, i, i, "ok") for i in range(3)]
    assert (sweep_dir / "report.md").is_file()


def test_resume_reruns_failed_runs_and_refuses_runs_of_another_config(in_process, monkeypatch, capsys):
    from hydra.core.hydra_config import HydraConfig

    import engines.hf

    step = engines.hf.HFEngine._step

    def broken_in_job_1(self):
        if HydraConfig.get().job.num == 1:
            raise RuntimeError("boom")
        return step(self)

    monkeypatch.setattr(engines.hf.HFEngine, "_step", broken_in_job_1)
    args = ["-m", *SMOKE, "arrival.concurrency=1,2", "hydra.sweep.dir=sweep"]
    assert run_app(args) == 1
    monkeypatch.setattr(engines.hf.HFEngine, "_step", step)
    first = next((in_process / "sweep").glob("0_*")) / "metadata.json"
    kept = first.stat().st_mtime_ns, first.read_text()
    capsys.readouterr()

    assert run_app([*args, "resume=true"]) == 0
    assert "run 1 of 2: arrival.concurrency=1 reused" in capsys.readouterr().err
    assert [(r.run["concurrency"], r.status) for r in find_runs([in_process / "sweep"])[0]] == [(1, "ok"), (2, "ok")]
    assert (first.stat().st_mtime_ns, first.read_text()) == kept

    assert run_app([*args, "workload.num_requests=3", "resume=true"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: resume=true: ") and "finished with another config (workload.num_requests: 4 -> 3)" in line
    assert run_app(["-m", *SMOKE, "arrival.concurrency=1", "hydra.sweep.dir=sweep", "resume=true"]) == 2
    assert "is not a run of the sweep asked for now" in capsys.readouterr().err
    assert (first.stat().st_mtime_ns, first.read_text()) == kept and len(find_runs([in_process / "sweep"])[0]) == 2


# A stand-in for the killed sweeps: the second run (and any after it) waits while the file `hold` exists.
HOLD_AFTER_THE_FIRST_RUN = (
    "import os, time\n"
    "import harness.bench.target\n"
    "from hydra.core.hydra_config import HydraConfig\n"
    "warm_up = harness.bench.target.warm_up\n"
    "def held(*args, **kwargs):\n"
    "    if HydraConfig.get().job.num >= 1:\n"
    "        open('holding', 'w').close()\n"
    "    while os.path.exists('hold') and HydraConfig.get().job.num >= 1:\n"
    "        time.sleep(0.05)\n"
    "    return warm_up(*args, **kwargs)\n"
    "harness.bench.target.warm_up = held\n")


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_killed_sweep_keeps_its_finished_runs_and_resume_runs_only_the_rest(in_process, capsys, sig):
    """The sweep runs in a subprocess, killed while its second run is under way; the report and the resumed
    sweep run in this process (the same code as `harness report` and `python -m harness`, without the start-up)."""
    tmp_path = in_process
    env = with_site(tmp_path, HOLD_AFTER_THE_FIRST_RUN)
    (tmp_path / "hold").touch()
    # SIGKILL: the default sweep folder, which resume=true finds as the latest of the experiment
    where = ["hydra.sweep.dir=sweep"] if sig == signal.SIGINT else []
    args = [sys.executable, "-m", "harness", "-m", *SMOKE, "arrival.concurrency=1,2,3", *where]
    # Ctrl-C as at a terminal: a test run started in the background of a shell inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler, so the sweep would never see the signal
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sweeps = lambda: [tmp_path / "sweep"] if where else sorted((tmp_path / "multirun" / "smoke").glob("*"))  # noqa: E731
    # the signal lands while the second run is held, before its warm-up
    _wait_for(lambda: any(sweeps()) and all(d.exists() for d in sweeps()) and any(sweeps()[0].glob("1_*/.hydra"))
              and (tmp_path / "holding").exists(), "the second run")
    sweep_dir = sweeps()[0]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert f"interrupted: the finished runs in {sweep_dir.relative_to(tmp_path)} keep their results" in stderr
        assert "resume=true" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    runs, unfinished = find_runs([sweep_dir])
    assert [(job_number(r.path), r.status) for r in runs] == [(0, "ok")] and [job_number(p) for p in unfinished] == [1]
    first = runs[0].path / "metadata.json"
    kept = first.stat().st_mtime_ns, first.read_text()

    assert cli_main(["report", str(sweep_dir.relative_to(tmp_path))]) == 0
    text = (sweep_dir / "report.md").read_text()
    assert "from 1 runs" in text and "unfinished (no results)" in text

    capsys.readouterr()
    assert cli_main([*args[3:], "resume=true"]) == 0  # the same command line, resumed
    err = capsys.readouterr().err
    assert "run 1 of 3: arrival.concurrency=1 reused (finished earlier)" in err
    assert "run 2 of 3: arrival.concurrency=2 ok in " in err and "run 3 of 3: arrival.concurrency=3 ok in " in err
    runs, unfinished = find_runs([sweep_dir])
    assert [(r.run["concurrency"], r.status) for r in runs] == [(1, "ok"), (2, "ok"), (3, "ok")] and not unfinished
    assert (first.stat().st_mtime_ns, first.read_text()) == kept  # the finished run was not run again
    assert "from 3 runs" in (sweep_dir / "report.md").read_text()


def test_memory_waste_in_ci_size_ranks_the_reservation_policies(tmp_path):
    """The vLLM paper's Fig. 2 experiment, CPU-sized (with vattention beside it): paging holds the most token
    states and wastes little (sampled after each step's admissions, the slots that step is about to fill count as
    reservation: ~5% of a full pool here); an exact reservation has no internal fragmentation; max
    reserves the most."""
    done = harness(["+experiment=memory_waste", "workload.num_requests=48", "engine.num_kv_slots=4096",
                    "hydra.sweep.dir=sweep"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = pd.read_parquet(tmp_path / "sweep" / "runs.parquet").set_index("engine_label")
    share = runs["kv_token_states_used_frac"]
    assert share["paged"] > 0.9 and runs.loc["paged", "kv_waste"] < 0.08
    assert share["paged"] > share["contiguous_oracle"] > share["contiguous"]
    assert runs.loc["contiguous_oracle", "kv_internal_used_frac"] < 0.01
    assert runs.loc["contiguous", "kv_internal_used_frac"] > runs.loc["contiguous_pow2", "kv_internal_used_frac"]
    assert runs.loc["paged", "max_running"] > runs.loc["contiguous", "max_running"]
    # virtual-contiguous KV at the host's 4 KiB pages (16 tokens of tiny-qwen3): close to paging, and its row is there
    assert share["vattention"] > share["contiguous_oracle"] and runs.loc["vattention", "kv_external_used_frac"] == 0
    assert runs.loc["vattention", "max_running"] > runs.loc["contiguous", "max_running"]
    assert (tmp_path / "sweep" / "figures" / "kv_breakdown.png").is_file()


def test_sliding_window_in_ci_size_shows_what_freeing_the_window_buys(tmp_path):
    """tiny-mistral-sw (a 64-token window), 48 requests of 64-512 + 64-512 tokens at once into 8,192 slots: the
    paged engine frees what leaves the window and runs them all at once; the others hold whole contexts."""
    done = harness(["+experiment=sliding_window", "hydra.sweep.dir=sweep"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = pd.read_parquet(tmp_path / "sweep" / "runs.parquet").set_index("engine_label")
    assert runs.loc["paged", "max_running"] == 48 and runs.loc["paged", "preemptions"] == 0
    assert runs.loc["paged", "max_running"] > runs.loc["vattention", "max_running"]
    assert runs.loc["paged", "max_running"] > runs.loc["contiguous_oracle", "max_running"]
