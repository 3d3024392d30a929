"""The vLLM paper's experiments: the sustainable-rate rule, saturation skipping, the kept engine, offered load and
arrival windows, the new run figures, and the CPU-sized `paper_repro` end to end with its report section."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from engines.base import KVStats
from engines.kv.accounting import KVLog
from harness.bench.arrivals import timed_plan
from harness.bench.engine_keeper import EngineKeeper
from harness.bench.kv_breakdown import step_counts
from harness.bench.metrics import request_table, summarize
from harness.bench.paper import PAPER_FIG2, SYSTEMS, paper_runs, section, system_of
from harness.bench.results import write_run
from harness.bench.runner import RunRecord, SampleRecord
from harness.bench.saturation import saturated
from harness.bench.schema import ArrivalSpec, LengthDist, SaturationSpec, WorkloadSpec
from harness.bench.sustain import crossing, sustainable_rates, unloaded_latency
from harness.common.errors import UserError


def curve(points: list[tuple[float, float | None]], repeat: int = 0, system: str = "vLLM") -> pd.DataFrame:
    """(rate, latency) points; latency None is a point skipped as saturated."""
    return pd.DataFrame([{"rate": r, "norm_latency_mean": math.nan if lat is None else lat,
                          "status": "skipped" if lat is None else "ok", "repeat": repeat, "system": system}
                         for r, lat in points])


# --- the rule ------------------------------------------------------------------------------------------------------


def test_the_crossing_is_interpolated_between_the_last_rate_within_and_the_first_beyond():
    c = crossing(curve([(1, 0.01), (2, 0.02), (4, 0.05), (8, None)]), limit=0.03)
    assert c.bound == "" and c.rate == pytest.approx(2 + (0.03 - 0.02) / (0.05 - 0.02) * 2)


def test_a_curve_that_never_crosses_is_a_lower_bound_and_one_that_starts_above_an_upper_bound():
    assert crossing(curve([(1, 0.01), (2, 0.02)]), limit=0.03) == crossing(curve([(2, 0.02), (1, 0.01)]), 0.03)
    assert (crossing(curve([(1, 0.01), (2, 0.02)]), 0.03).bound, crossing(curve([(1, 0.01), (2, 0.02)]), 0.03).rate) == (">=", 2)
    assert (crossing(curve([(1, 0.05), (2, 0.09)]), 0.03).bound, crossing(curve([(1, 0.05)]), 0.03).rate) == ("<", 1)


def test_a_point_exactly_at_the_limit_is_sustained():
    assert crossing(curve([(1, 0.01), (2, 0.03), (4, 0.09)]), limit=0.03).rate == pytest.approx(2.0)


def test_unloaded_latency_is_read_at_the_lowest_rate_every_system_ran():
    runs = pd.concat([curve([(0.5, 0.001), (1, 0.011), (2, 0.02)], system="Orca (Max)"),
                      curve([(1, 0.010), (2, 0.012)], system="vLLM"), curve([(1, 0.012)], repeat=1, system="vLLM")])
    assert unloaded_latency(runs) == (pytest.approx(0.011), 1.0)  # vLLM's median of 0.010 and 0.012; Max's 0.5 is its own


def test_sustainable_rate_is_the_median_over_repeats_and_says_when_a_repeat_gave_only_a_bound():
    runs = pd.concat([curve([(1, 0.01), (2, 0.05)], repeat=0), curve([(1, 0.01), (2, 0.07)], repeat=1),
                      curve([(1, 0.01), (2, 0.02)], repeat=2)])
    s = sustainable_rates(runs, limit=0.03)["vLLM"]
    assert s.per_repeat == pytest.approx((1.5, 1 + 1 / 3, 2.0)) and s.estimate.value == pytest.approx(1.5)
    assert s.bound == ">=" and s.estimate.low == pytest.approx(4 / 3) and s.estimate.high == pytest.approx(2.0)


# --- skipping saturated points -------------------------------------------------------------------------------------


def _finished(sweep, name: str, params: dict, latency: float, repeat: int = 0, status: str = "ok") -> None:
    write_run(sweep / name, {"status": status, "norm_latency_mean": latency},
              {"status": status, "params": params, "repeat": repeat})


def test_a_higher_load_is_skipped_once_a_lower_one_of_the_same_series_and_repeat_exploded(tmp_path):
    spec = SaturationSpec(along="arrival.load", sustain_factor=3.0, skip_factor=5.0)
    series = {"engine": "paged", "workload": "alpaca_like"}
    _finished(tmp_path, "0_a", {**series, "arrival.load": 100}, 0.01)
    _finished(tmp_path, "1_b", {**series, "arrival.load": 200}, 0.049)
    assert saturated(spec, {**series, "arrival.load": 400}, 0, tmp_path) is None  # 4.9x: not yet
    _finished(tmp_path, "2_c", {**series, "arrival.load": 400}, 0.051)
    reason = saturated(spec, {**series, "arrival.load": 800}, 0, tmp_path)
    assert reason.startswith("saturated: at arrival.load=400 (2_c)")
    assert saturated(spec, {**series, "arrival.load": 300}, 0, tmp_path) is None  # only lower loads count
    assert saturated(spec, {**series, "arrival.load": 800}, 1, tmp_path) is None  # another repeat
    assert saturated(spec, {"engine": "contiguous", "workload": "alpaca_like", "arrival.load": 800}, 0, tmp_path) is None
    assert saturated(SaturationSpec(along="arrival.load"), {**series, "arrival.load": 800}, 0, tmp_path) is None
    assert saturated(spec, {**series}, 0, tmp_path) is None  # not swept along the load


def test_saturation_settings_are_checked():
    with pytest.raises(UserError, match="skip_factor must be at least sustain_factor"):
        SaturationSpec(sustain_factor=3.0, skip_factor=2.9)
    assert SaturationSpec(sustain_factor=3.0, skip_factor=3.0).skip_factor == 3.0
    with pytest.raises(UserError, match="sustain_factor must be > 1"):
        SaturationSpec(sustain_factor=1.0)


# --- the kept engine -----------------------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self, allocated: int = 0, cached: int = 0, busy: bool = False) -> None:
        self.stats, self.busy, self.closed = KVStats(100, 0, allocated, 100 - allocated, 0, cached=cached), busy, False

    def has_unfinished(self) -> bool:
        return self.busy

    def kv_stats(self) -> KVStats:
        return self.stats

    def close(self) -> None:
        self.closed = True


def test_a_kept_engine_is_reused_only_for_the_same_key_and_only_when_clean():
    keeper = EngineKeeper()
    first = FakeEngine()
    engine, reused = keeper.acquire("a", lambda: first)
    assert (engine, reused) == (first, False)
    keeper.release(engine, "a", keep=True)
    assert keeper.acquire("a", FakeEngine) == (first, True) and not first.closed
    keeper.release(first, "a", keep=True)
    other, reused = keeper.acquire("b", FakeEngine)
    assert not reused and first.closed and other is not first  # another setting: the kept one is closed first
    keeper.release(other, "b", keep=False)
    assert other.closed and not keeper.holding
    for dirty in (FakeEngine(cached=16), FakeEngine(allocated=8), FakeEngine(busy=True)):
        keeper.release(dirty, "c", keep=True)
        fresh, reused = keeper.acquire("c", FakeEngine)
        assert not reused and fresh is not dirty and dirty.closed


# --- offered load and arrival window -------------------------------------------------------------------------------


def test_a_load_sets_the_rate_from_the_mean_output_length_and_a_window_the_number_of_requests():
    workload = WorkloadSpec(num_requests=5, output=LengthDist(dist="lognormal", mean=58, sigma=0.8, low=4, high=512))
    arrival, planned = timed_plan(ArrivalSpec(process="poisson", load=1740, window=10), workload, 58.0)
    assert arrival.rate == pytest.approx(30.0) and arrival.load == 1740 and planned.num_requests == 300
    arrival, planned = timed_plan(ArrivalSpec(process="poisson", rate=2.5, window=3), workload, 58.0)
    assert arrival.rate == 2.5 and planned.num_requests == 8
    assert timed_plan(ArrivalSpec(process="poisson", rate=2.5), workload, 58.0)[1].num_requests == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"process": "poisson", "rate": 2.0, "load": 100.0}, "set rate or load, not both"),
    ({"process": "closed", "concurrency": 2, "load": 100.0}, "arrival.load must be > 0 and needs process poisson"),
    ({"process": "offline", "window": 3.0}, "arrival.window must be > 0 and needs process poisson"),
    ({"process": "poisson", "load": -1.0}, "arrival.load must be > 0"),
    ({"process": "poisson"}, "arrival.rate must be > 0"),
])
def test_bad_load_and_window_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        ArrivalSpec(**kwargs)


# --- the new run figures -------------------------------------------------------------------------------------------


def test_normalized_latency_is_each_samples_e2e_over_its_output_tokens_and_its_run_figure_the_mean():
    samples = [SampleRecord("a", 0, 4, arrival=0.0, token_times=[0.5, 1.0, 2.0, 4.0], finish=4.0, finish_reason="length"),
               SampleRecord("b", 0, 4, arrival=1.0, token_times=[1.5, 2.0], finish=2.0, finish_reason="length"),
               SampleRecord("c", 0, 4, arrival=1.0, token_times=[1.5], finish=1.5, finish_reason="abort")]
    table = request_table(RunRecord(0.0, 4.0, samples, KVLog(), 2))
    assert table["norm_latency_s"].tolist()[:2] == [pytest.approx(1.0), pytest.approx(0.5)]
    assert summarize(table, 4.0, None, None)["norm_latency_mean"] == pytest.approx(0.75)  # the aborted one is out


def test_mean_running_is_the_mean_batch_over_steps():
    steps = pd.DataFrame({"num_running": [1, 3, 8], "preemptions": [0, 0, 1], "prefix_cache_queries": [0, 0, 0],
                          "prefix_cache_hits": [0, 0, 0]})
    counts = step_counts(steps)
    assert counts["mean_running"] == pytest.approx(4.0) and counts["max_running"] == 8


# --- the paper's systems and the report section --------------------------------------------------------------------


def test_the_systems_are_named_by_engine_and_reservation():
    rows = [{"engine": "contiguous", "engine.reservation": r} for r in ("max", "pow2", "oracle")]
    assert [system_of(pd.Series(r)) for r in rows + [{"engine": "paged"}, {"engine": "hf"}]] == [*SYSTEMS, None]
    assert set(PAPER_FIG2) == set(SYSTEMS)


def _paper_table() -> pd.DataFrame:
    """A synthetic paper sweep: vLLM crosses at twice Max's rate, every repeat; Max skipped past its explosion."""
    rows = []
    for repeat in range(3):
        for system, engine, reservation, knee in (("Orca (Max)", "contiguous", "max", 2.0), ("vLLM", "paged", None, 4.0)):
            for rate in (1.0, 2.0, 4.0, 8.0):
                latency = 0.01 if rate < knee else 0.01 * (1 + 4 * (rate / knee)) * (1 + 0.01 * repeat)
                skipped = rate > 2 * knee
                rows.append({"engine": engine, "engine.reservation": reservation, "arrival": "poisson", "rate": rate,
                             "workload": "sharegpt_like", "repeat": repeat, "status": "skipped" if skipped else "ok",
                             "reason": "saturated: ..." if skipped else None, "norm_latency_mean": math.nan if skipped else latency,
                             "mean_running": rate * 3, **{f"kv_{c}_used_frac": 0.25 for c in
                                                          ("token_states", "reservation", "internal", "external")}})
    return pd.DataFrame(rows)


def test_the_paper_section_reads_the_ratio_of_sustainable_rates_and_draws_three_figures(tmp_path):
    table = _paper_table()
    assert len(paper_runs(table)) == len(table)
    s = section(table, tmp_path, factor=3.0)
    tables = dict(s.tables)
    ratios = tables["Fig. 12: how much higher a rate vLLM sustains"].set_index("ratio")
    # the limit is 3 x 0.01: Max crosses it at 1.5 req/s (0.01 at 1, 0.05 at 2), vLLM at 3 (0.01 at 2, 0.05 at 4)
    assert ratios.loc["vLLM / Orca (Max)", "ours"].startswith("2x") and ratios.loc["vLLM / Orca (Max)", "paper (OPT-13B..175B)"] == "2.7-8x"
    batch = tables["Fig. 13: mean requests batched"].set_index("system")
    assert batch.loc["vLLM", "paper"] == "30.42" and batch.loc["vLLM", "ours"].startswith("6")  # 2 req/s x 3
    assert [f.file(tmp_path).is_file() for f in s.figures] == [True, True, True]
    assert section(table[table["engine"] == "paged"], tmp_path, 3.0) is None  # one system: nothing to compare


def test_paper_repro_runs_at_ci_size_and_reports_beside_the_paper(tmp_path, tiny_model):
    tiny_model("tiny-llama")
    done = subprocess.run([sys.executable, "-m", "harness", "+experiment=paper_repro", "arrival.load=1731,4431",
                           "arrival.window=1", "hydra.sweep.dir=sweep"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "sweep" / "runs.parquet")
    assert set(runs["status"]) <= {"ok", "skipped"} and (runs["status"] == "ok").sum() >= 8
    assert runs["norm_latency_mean"].notna().all() and (runs["mean_running"] >= 1).all()
    assert runs["rate"].round(2).isin([5.12, 13.11, 29.84, 76.40]).all()  # 1731 and 4431 tok/s over 338 and 58 tokens
    metadata = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/metadata.json"))]
    assert sum(m.get("engine_reused", False) for m in metadata) >= 4  # one engine per system, kept across its runs
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Beside the vLLM paper" in report and "Fig. 13: mean requests batched" in report
    assert (tmp_path / "sweep" / "figures" / "paper_fig12_normalized_latency.png").is_file()


def test_a_repeat_cut_short_is_left_out_of_the_sustainable_rate_and_named():
    table = _paper_table()
    cut = (table["engine"] == "paged") & (table["repeat"] == 2) & (table["rate"] > 1.0)
    s = section(table[~cut], Path(tempfile.mkdtemp()), factor=3.0)
    rates = dict(s.tables)["Fig. 12: sustainable rates (medians over repeats, 95% bootstrap intervals)"].set_index("system")
    assert len(rates.loc["vLLM", "per repeat"].split(", ")) == 2 and not rates.loc["vLLM", "sustainable rate (req/s)"].startswith("≥")
    assert "Left out as incomplete" in s.paragraphs[1] and "vLLM repeat 2 (stopped at 1 req/s)" in s.paragraphs[1]
