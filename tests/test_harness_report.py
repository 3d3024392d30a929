"""The report: helpers on tables, and report.md of a synthetic sweep with 3 repeats per point, built on disk
with harness.bench.results.write_run (hand-computable medians, intervals and ratios)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from engines.step_clock import HOST_PHASES
from harness.bench import report as report_module
from harness.bench.report import (
    METHODOLOGY,
    REPO,
    methodology_link,
    name_series,
    normalize,
    paging_ratios,
    paging_statement,
    sweep_axis,
    write_report,
)
from harness.bench.results import write_run

CONCURRENCY = "param.arrival.concurrency"
# output tokens/s per (engine label, concurrency), one value per repeat; None: that repeat failed
OUTPUT_TOK_S = {
    ("contiguous", 1): [100.0, 102.0, 104.0], ("contiguous", 4): [100.0, 110.0, 120.0],
    ("contiguous_pow2", 1): [95.0, 96.0, 97.0], ("contiguous_pow2", 4): [90.0, 100.0, None],
    ("paged", 1): [90.0, 92.0, 94.0], ("paged", 4): [200.0, 230.0, 250.0],
    ("hf", 1): [50.0, 51.0, 52.0], ("hf", 4): [60.0, 61.0, 62.0],
    ("vattention", 1): [80.0, 81.0, 82.0], ("vattention", 4): [300.0, 310.0, 320.0],
}
ENGINE = {"contiguous": "contiguous", "contiguous_pow2": "contiguous", "paged": "paged", "hf": "hf",
          "vattention": "vattention"}
RESERVATION = {"contiguous": "max", "contiguous_pow2": "pow2"}
OOM = "RuntimeError: CUDA out of memory"


def _run_row(label: str, concurrency: int, repeat: int, output_tok_s: float | None) -> dict:
    breakdown = label != "hf"
    row = {"experiment": "concurrency_sweep", "engine": ENGINE[label], "engine_label": label,
           "engine.reservation": RESERVATION.get(label), "param.engine": label, CONCURRENCY: concurrency,
           "param.seed": repeat, "repeat": repeat, "seed": repeat, "hardware": "cpu (2 cores)", "model": "tiny",
           "workload_label": f"fixed: 8 requests, closed loop c={concurrency}", "kv_breakdown": breakdown}
    if output_tok_s is None:
        return {**row, "status": "failed", "reason": f"Traceback (most recent call last):\n{OOM}"}
    used = {"token_states": 0.6, "reservation": 0.2, "internal": 0.15, "external": 0.05}
    kv = {f"kv_{c}_used_frac": (v if breakdown else math.nan) for c, v in used.items()}
    return {**row, "status": "ok", "reason": None, "completed": 8, "failed": 0, "output_tok_s": output_tok_s,
            "total_tok_s": 5 * output_tok_s, "requests_s": output_tok_s / 16, "goodput_req_s": output_tok_s / 16,
            "ttft_p95": 0.01 * concurrency + 0.001 * repeat, "tpot_p95": 0.002 + 0.0001 * repeat,
            "itl_p95": 0.002, "e2e_p95": 0.05 * concurrency, "queue_p95": 0.001, "max_running": concurrency,
            "preemptions": 0, "roofline_efficiency": math.nan, "kv_mean_capacity": 1000.0 if breakdown else 400.0,
            "kv_token_states_frac": 0.3 if breakdown else math.nan, "kv_waste": 0.2 if breakdown else math.nan,
            "kv_fragmentation": 0.1 if breakdown else math.nan, **kv}


def _tables(concurrency: int, breakdown: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    requests = pd.DataFrame({"ttft_s": [0.01 * concurrency * (1 + i / 8) for i in range(8)],
                             "tpot_s": [0.002 * (1 + i / 16) for i in range(8)], "e2e_s": [0.05] * 8,
                             "error": [None] * 8})
    t = [0.0, 0.1, 0.2, 0.3]
    part = (lambda v: v) if breakdown else (lambda v: [0] * len(v))
    steps = pd.DataFrame({"t_s": t, "capacity": [1000] * 4, "token_states": [0, 300, 500, 200],
                          "reservation": part([0, 100, 100, 20]), "internal": part([0, 50, 60, 10]),
                          "external": part([0, 0, 40, 30]), "allocated": [0, 450, 660, 230],
                          "free": [1000, 550, 340, 770], "num_running": [0, concurrency, concurrency, 1],
                          "num_waiting": [0, 0, 0, 0], "preemptions": [0, 0, 0, 0]})
    return requests, steps


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Four engine configs x concurrency 1, 4 x 3 repeats, interleaved as a sweep runs them; one repeat failed."""
    root = tmp_path_factory.mktemp("report") / "sweep"
    k = 0
    for repeat in range(3):
        for (label, concurrency), values in OUTPUT_TOK_S.items():
            row = _run_row(label, concurrency, repeat, values[repeat])
            metadata = {"status": row["status"], "reason": row["reason"], "versions": {"python": "3.11"},
                        "git": {"commit": "0" * 40}, "model_dir": "tiny", "model_shape": {"num_parameters": 1e6}}
            requests, steps = _tables(concurrency, row["kv_breakdown"]) if row["status"] == "ok" else (None, None)
            write_run(root / f"{k}_{label}_c{concurrency}_r{repeat}", row, metadata, requests, steps)
            k += 1
    write_report([root], root)
    return root


@pytest.fixture(scope="module")
def report(sweep) -> str:
    return (sweep / "report.md").read_text()


def _table(report: str, section: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under ``## section``, as {column: cell}."""
    lines = report.split(f"## {section}\n")[1].split("\n## ")[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def _find(report: str, section: str, **match: str) -> dict[str, str]:
    """The one row of that table with the given cells."""
    found = [r for r in _table(report, section) if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (section, match, found)
    return found[0]


def _runs(report: str, engine: str, concurrency: str | None = None) -> dict[str, str]:
    axis = {"concurrency (closed-loop clients)": concurrency} if concurrency else {}
    return _find(report, "Runs", engine=engine, **axis)


def _ratio(report: str, contiguous: str, concurrency: str) -> dict[str, str]:
    return _find(report, "Paged against contiguous", paged="paged", against=contiguous,
                 **{"concurrency (closed-loop clients)": concurrency})


def test_every_headline_figure_is_the_median_with_its_interval_and_the_repeats(report):
    contiguous = _runs(report, "contiguous", "4")
    assert contiguous["repeats"] == "3" and contiguous["status"] == "ok"
    assert contiguous["output tok/s"] == "110 [100–120]"  # 3 repeats: the interval is their range
    assert contiguous["total tok/s"] == "550 [500–600]"
    assert contiguous["p95 TTFT s"] == "0.041 [0.04–0.042]"
    assert contiguous["KV token states"] == "30.0%"  # equal in every repeat: no interval to show
    assert _runs(report, "paged", "4")["output tok/s"] == "230 [200–250]"


def test_a_failed_repeat_is_left_out_of_the_median_and_counted(report):
    pow2 = _runs(report, "contiguous_pow2", "4")
    assert pow2["repeats"] == "2" and pow2["status"] == "2 ok, 1 failed"
    assert pow2["output tok/s"] == "95 [90–100]"


def test_a_failed_run_is_named_in_the_notes_and_under_every_figure(report):
    assert f"- failed: contiguous_pow2 (1 runs): {OOM}\n" in report  # a traceback's last line
    named = f"Not shown: failed: contiguous_pow2 at concurrency 4, repeat 2 ({OOM})."
    captions = [line for line in report.splitlines() if line.startswith("*") and "Hardware:" in line]
    assert len(captions) >= 4 and all(named in c for c in captions)


def test_an_engine_without_a_kv_breakdown_reads_n_a(report):
    for concurrency in ("1", "4"):
        hf = _runs(report, "hf", concurrency)
        assert hf["KV token states"] == hf["KV waste"] == hf["KV fragmentation"] == "n/a"
        assert hf["output tok/s"] != "n/a"
    assert _runs(report, "paged", "1")["KV waste"] == "20.0%"
    assert "no KV breakdown: hf reports none" in report


def test_paged_against_each_contiguous_config_with_intervals(report):
    gain = _ratio(report, "contiguous", "4")
    # 230 / 110; independent resampling reaches 200 / 120 and 250 / 100
    assert gain["output tok/s ratio"] == "2.09 [1.67–2.5]" and gain["repeats"] == "3 / 3"
    # p95 TPOT: repeats 0.0020, 0.0021, 0.0022 on both sides
    assert gain["p95 TPOT ratio"] == f"1 [{0.002 / 0.0022:.3g}–{0.0022 / 0.002:.3g}]"
    assert _ratio(report, "contiguous", "1")["output tok/s ratio"] == "0.902 [0.865–0.94]"  # 92/102 in [90/104, 94/100]
    pow2 = _ratio(report, "contiguous_pow2", "4")
    assert pow2["output tok/s ratio"] == "2.42 [2–2.78]" and pow2["repeats"] == "3 / 2"  # 230/95, 200/100, 250/90
    assert {r["against"] for r in _table(report, "Paged against contiguous")} == {"contiguous", "contiguous_pow2"}
    assert len(_table(report, "Paged against contiguous")) == 4


def test_one_statement_of_what_paging_bought_and_cost(report):
    # against the contiguous config with the most output tokens/s at each setting: contiguous (max) at both
    statement = report.split("## What paging bought and cost\n\n")[1].split("\n")[0]
    assert statement.startswith("At concurrency 4, paged gave 2.09x [1.67–2.5] the output tokens/s of "
                                "contiguous (max reservation); at concurrency 1 it cost 9.8% [6.0–13.5%].")
    assert "Medians over 3 paged and 3 contiguous repeats" in statement


def test_the_repeat_and_the_seed_are_never_the_sweep_axis(sweep, report):
    assert list(_table(report, "Runs")[0])[:4] == ["engine", "concurrency (closed-loop clients)", "repeats", "status"]
    figures = sorted(p.name for p in (sweep / "figures").iterdir())
    assert "throughput_latency_vs_arrival_concurrency.png" in figures and "latency_vs_throughput.png" in figures
    assert not [f for f in figures if "seed" in f or "repeat" in f]
    runs = pd.DataFrame({"param.seed": [0, 1, 2, 0], "param.repeat": [0, 1, 2, 0], "repeat": [0, 1, 2, 0],
                         "param.engine": ["paged", "paged", "paged", "hf"]})
    assert sweep_axis(runs) is None
    assert sweep_axis(runs.assign(**{CONCURRENCY: [1, 1, 4, 4]})) == CONCURRENCY


def test_every_figure_is_drawn(sweep, report):
    for name in ("throughput_latency_vs_arrival_concurrency", "latency_vs_throughput", "ttft_tpot_distributions",
                 "kv_breakdown", "kv_usage_over_time"):
        assert f"](figures/{name}.png)" in report
        assert (sweep / "figures" / f"{name}.png").stat().st_size > 5000
    html = (sweep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "230 [200–250]" in html


def test_the_report_links_to_the_methodology(report, tmp_path):
    assert f"[docs/methodology.md]({METHODOLOGY})" in report  # written outside the repository: its path
    assert "DESIGN.md" not in report
    assert methodology_link(REPO / "reports" / "h100" / "sweep") == "../../../docs/methodology.md"
    assert methodology_link(REPO) == "docs/methodology.md"
    assert methodology_link(tmp_path) == str(METHODOLOGY)


def test_old_runs_get_repeat_0_and_a_breakdown_only_where_they_could_have_one():
    # the last: a served run whose KV usage came from /metrics (a capacity, no split)
    old = pd.DataFrame({"engine": ["hf_paged", "paged", "hf", "contiguous", "paged"],
                        "kv_mean_capacity": [400.0, 900.0, 0.0, 0.0, 900.0],
                        "kv_token_states_used_frac": [1.0, 0.99, 1.0, math.nan, math.nan],
                        "kv_waste": [0.0, 0.01, 0.0, math.nan, math.nan]})
    table = normalize(old)
    assert table["repeat"].tolist() == [0] * 5
    assert table["kv_breakdown"].tolist() == [False, True, False, False, False]
    assert table["kv_token_states_used_frac"].isna().tolist() == [True, False, True, True, True]
    new = normalize(old.assign(repeat=[0, 1, 2, None, 0], kv_breakdown=[True, False, None, None, None]))
    assert new["repeat"].tolist() == [0, 1, 2, 0, 0]
    assert new["kv_breakdown"].tolist() == [True, False, False, False, False]
    assert old["kv_token_states_used_frac"].iloc[0] == 1.0  # the caller's table is left as it was


RECORDED = REPO / "experiments" / "h100-2026-11-23" / "throughput"


@pytest.mark.skipif(not RECORDED.is_dir(), reason="the recorded GPU runs are not in this checkout")
def test_a_recorded_run_without_repeat_or_kv_breakdown_columns_still_reports(tmp_path):
    assert write_report([RECORDED], tmp_path) == tmp_path / "report.md"
    report = (tmp_path / "report.md").read_text()
    hf_paged = _runs(report, "hf_paged")
    assert hf_paged["repeats"] == "1" and hf_paged["KV token states"] == "n/a"  # it was drawn as 100% token states
    assert _runs(report, "paged")["output tok/s"] == "16,016" and _runs(report, "paged")["KV token states"] == "21.9%"
    assert "of the output tokens/s of contiguous (max reservation)" in report


def _statement(output_tok_s: dict[tuple[str, int], float]) -> str:
    ok = pd.DataFrame([{"engine": ENGINE[label], "engine_label": label, "base_label": label, CONCURRENCY: c,
                        "output_tok_s": v} for (label, c), v in output_tok_s.items()])
    return paging_statement(ok, paging_ratios(ok, CONCURRENCY), CONCURRENCY)


def test_the_statement_says_when_paging_never_gained_or_never_cost():
    gains = _statement({("paged", 1): 110.0, ("paged", 4): 300.0, ("contiguous", 1): 100.0, ("contiguous", 4): 100.0})
    assert gains.startswith("At concurrency 4, paged gave 3x the output tokens/s of contiguous; it cost no output "
                            "tokens/s at any concurrency (smallest gain: 1.1x at concurrency 1 against contiguous).")
    costs = _statement({("paged", 1): 90.0, ("paged", 4): 50.0, ("contiguous", 1): 100.0, ("contiguous", 4): 100.0})
    assert costs.startswith("Paged gave no more output tokens/s than the strongest contiguous policy at any concurrency; "
                            "at concurrency 4 it cost 50.0% of the output tokens/s of contiguous.")
    # against the strongest policy paging only cost; against a weaker one it gained, and the statement says so
    mixed = _statement({("paged", 1): 90.0, ("paged", 4): 200.0, ("contiguous", 1): 100.0, ("contiguous", 4): 210.0,
                        ("contiguous_pow2", 1): 100.0, ("contiguous_pow2", 4): 50.0})
    assert "Against every contiguous policy, its largest gain was 4x the output tokens/s of contiguous_pow2 at " \
           "concurrency 4." in mixed
    assert "One run each: no interval" in costs
    assert _statement({("paged", 1): 90.0, ("hf", 1): 10.0}) == "Paging: no contiguous run to compare."
    assert _statement({("contiguous", 1): 90.0}) == "Paging: no paged run to compare."


def test_paged_pairs_only_with_contiguous_series_of_the_same_name_measured_the_same_way():
    ok = pd.DataFrame({"engine": ["paged", "contiguous", "contiguous", "hf", "contiguous"],
                       "engine_label": ["paged · a", "contiguous · a", "contiguous · b", "hf · a", "contiguous@http · a"],
                       "base_label": ["paged", "contiguous", "contiguous", "hf", "contiguous@http"],
                       "output_tok_s": [300.0, 100.0, 150.0, 10.0, 90.0]})
    ratios = paging_ratios(ok, None)
    assert [(r.paged, r.contiguous, r.n_paged, r.n_contiguous) for r in ratios] == [("paged · a", "contiguous · a", 1, 1)]
    assert ratios[0].metrics["output_tok_s"].value == 3.0 and not ratios[0].metrics["output_tok_s"].has_interval


def test_runs_of_several_names_under_one_engine_label_become_separate_series():
    table = pd.DataFrame({"engine_label": ["paged", "paged", "paged@http", "contiguous", "contiguous"],
                          "param.name": ["offline", "offline_text", "serve", "offline", "offline"]})
    labels = name_series(table)["engine_label"].tolist()
    assert labels == ["paged · offline", "paged · offline_text", "paged@http", "contiguous", "contiguous"]
    assert table["engine_label"].tolist()[0] == "paged"  # the caller's table is left as it was
    assert name_series(table.drop(columns="param.name"))["engine_label"].tolist() == table["engine_label"].tolist()


def test_runs_kept_without_their_request_and_step_tables_report_without_those_figures(sweep, tmp_path):
    """A reference run committed with its run rows only (the per-request and per-step tables dropped for size)."""
    import shutil

    kept = tmp_path / "kept"
    shutil.copytree(sweep, kept, ignore=shutil.ignore_patterns("requests.*", "kv_steps.*", "figures", "report.*", "runs.*"))
    write_report([kept], tmp_path / "out")
    names = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"kv_breakdown.png", "throughput_latency_vs_arrival_concurrency.png"} <= names
    assert not names & {"ttft_tpot_distributions.png", "kv_usage_over_time.png"}
    assert "ttft_tpot_distributions.png" in {p.name for p in (sweep / "figures").iterdir()}


def test_runs_skipped_as_saturated_are_named_in_one_line_and_other_misses_each():
    from harness.bench.report import missing_runs

    table = pd.DataFrame({"engine_label": ["paged", "paged", "contiguous"], "status": ["skipped", "skipped", "failed"],
                          "reason": ["saturated: at arrival.rate=2 ...", "saturated: at arrival.rate=4 ...", OOM],
                          "param.arrival.rate": [4.0, 8.0, 2.0], "repeat": [0, 1, 0], "completed": [0, 0, 0]})
    assert missing_runs(table, "param.arrival.rate") == [
        "2 runs skipped as saturated: a lower arrival rate of their series and repeat had already exploded",
        "failed: contiguous at arrival rate 2, repeat 0 (RuntimeError: CUDA out of memory)"]


def test_a_boolean_override_varying_within_a_series_joins_its_label():
    """``engine.async_scheduling=true,false`` under one engine: two series, named by the setting (a boolean
    column, arrow-backed as the run table reads it, must not be added to a string as a boolean)."""
    from harness.bench.report import fold_params

    table = pd.DataFrame({"engine_label": ["paged", "paged", "contiguous"],
                          "param.engine.async_scheduling": pd.array([True, False, True], dtype="bool[pyarrow]")})
    got = fold_params(table, None)["engine_label"].tolist()
    assert got == ["paged · engine.async_scheduling=True", "paged · engine.async_scheduling=False", "contiguous"]


def test_virtual_contiguous_runs_get_their_ratios_against_both_other_strategies(report):
    title = "Virtual-contiguous against contiguous and paged"
    rows = _table(report, title)
    assert {(r["vattention"], r["against"]) for r in rows} == {
        ("vattention", "contiguous"), ("vattention", "contiguous_pow2"), ("vattention", "paged")}
    assert len(rows) == 6  # each pair at concurrency 1 and 4
    at4 = {r["against"]: r for r in rows if r["concurrency (closed-loop clients)"] == "4"}
    assert at4["paged"]["output tok/s ratio"].startswith("1.35")  # 310 / 230
    assert at4["contiguous"]["output tok/s ratio"].startswith("2.82")  # 310 / 110


@pytest.mark.parametrize("engines", [1, 3])
def test_the_step_anatomy_legend_sits_below_the_axis_label_for_any_number_of_engines(tmp_path, monkeypatch, engines):
    """The legend is placed a fixed distance under the axes: placed by a fraction of the axes' height, a one-engine
    figure's legend covered its axis label."""
    saved = {}
    monkeypatch.setattr(report_module.plt, "close", lambda fig: saved.setdefault("fig", fig))
    chosen = pd.DataFrame([{"engine_label": f"engine{k}", "n": 3, "step_ms": 5.0, "step_gpu_ms": 4.0,
                            "gpu_busy_frac": 0.9, "in_step_frac": 0.95, **{f"step_{p}_ms": 0.5 for p in HOST_PHASES}}
                           for k in range(engines)])
    ok = pd.DataFrame({"hardware": ["cpu"], "model": ["tiny"], "workload_label": ["fixed"]})
    report_module.fig_step_anatomy(chosen, ok, None, tmp_path, [])
    fig = saved["fig"]
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend, label = ax.get_legend().get_window_extent(renderer), ax.xaxis.label.get_window_extent(renderer)
    assert legend.y1 <= label.y0, (legend, label)
