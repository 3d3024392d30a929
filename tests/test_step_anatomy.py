"""The step anatomy (docs/methodology.md, "Step anatomy"): every step of our engines timed by phase, KV calls
counted apart wherever they happen, the same columns offline and on a GPU, and figures over a run by hand."""

from __future__ import annotations

import dataclasses
import math
import time

import pandas as pd
import pytest
import torch

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig
from engines.kv.accounting import KVLog
from engines.request import Request, SamplingParams
from engines.step_clock import HOST_PHASES, StepClock, StepTimes
from harness.bench.step_anatomy import RUN_COLUMNS, TIME_COLUMNS, summarize, with_times


class _SlowKV:
    """A KV manager whose allocation takes 30 ms; everything else passes."""

    capacity = 7

    def allocate(self, seq, n):
        time.sleep(0.03)
        return True


def test_kv_calls_count_as_kv_in_whichever_phase_they_happen_and_phases_sum_to_the_step():
    clock = StepClock(torch.device("cpu"))
    kv = clock.wrap(_SlowKV())
    assert kv.capacity == 7  # attributes pass through
    clock.start()
    time.sleep(0.01)
    assert kv.allocate(None, 1)
    clock.lap("schedule")
    kv.allocate(None, 1)
    clock.lap("postprocess")
    times, = clock.finish(step=4)
    assert times.step == 4
    assert times.kv >= 0.06 and times.schedule >= 0.01  # the 60 ms of KV calls left the phases they ran in
    assert times.postprocess < times.kv
    assert math.isclose(sum(getattr(times, p) for p in HOST_PHASES), times.wall, rel_tol=1e-9)


def test_a_clock_that_is_off_times_nothing_and_hands_the_kv_manager_over_untouched():
    clock = StepClock(torch.device("cpu"), enabled=False)
    kv = _SlowKV()
    assert clock.wrap(kv) is kv
    clock.start()
    clock.lap("schedule")
    clock.begin()
    clock.end()
    assert clock.finish(step=0) == []


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("tiny-qwen3")


def _run(model_dir, cfg, requests):
    engine = create_engine(model_dir, cfg)
    out = engine.generate(requests)
    return out, engine.kv_log()


def _requests():
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.8, top_k=4, seed=3, ignore_eos=True, n=2)]
    return [Request(f"r{i}", list(range(3, 30 + 11 * i)), params[i % 2]) for i in range(5)]


@pytest.mark.parametrize("cfg", [
    PagedConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=8),  # prompts in chunks, some sample nothing
    PagedConfig(num_scheduler_steps=4),
    ContiguousConfig(reservation="pow2", num_scheduler_steps=3),
], ids=["paged-chunked", "paged-multistep", "contiguous-multistep"])
def test_every_step_of_our_engines_is_timed_and_timing_changes_no_token(model_dir, cfg):
    timed, log = _run(model_dir, cfg, _requests())
    assert sorted(t.step for t in log.times) == [step for step, _, _ in log.samples]
    for t in log.times:
        phases = [getattr(t, p) for p in HOST_PHASES]
        assert min(phases) >= 0 and math.isclose(sum(phases), t.wall, rel_tol=1e-9)
        assert t.gpu > 0 and t.kv > 0  # on a CPU: the span's wall clock
    assert sum(t.sync for t in log.times) < sum(t.launch for t in log.times)  # a CPU computes at launch
    untimed, log_off = _run(model_dir, dataclasses.replace(cfg, step_anatomy=False), _requests())
    assert untimed == timed and log_off.times == [] and len(log_off.samples) == len(log.samples)


def _log_of_three_steps() -> KVLog:
    from engines.base import KVStats
    stats = KVStats(10, 1, 2, 8, 8)
    return KVLog(
        samples=[(s, float(s), stats) for s in (5, 6, 7)],
        times=[StepTimes(7, 0.4, 0.1, 0.1, 0.0, 0.0, 0.2, 0.0, 0.2),  # read first: it had a sync
               StepTimes(5, 0.2, 0.0, 0.05, 0.05, 0.05, 0.05, 0.0, 0.12)],
    )


def test_times_join_the_step_table_on_the_step_number_and_a_step_without_times_gets_nan():
    log = _log_of_three_steps()
    steps = with_times(pd.DataFrame({"step": [5, 6, 7], "t_s": [0.0, 1.0, 2.0]}), log)
    assert list(steps.columns) == ["step", "t_s", *TIME_COLUMNS]
    assert steps["step_s"].tolist()[::2] == [0.2, 0.4] and math.isnan(steps["step_s"][1])
    assert steps["gpu_s"].tolist()[::2] == [0.12, 0.2]
    assert list(with_times(pd.DataFrame({"step": [], "t_s": []}), log).columns)[2:] == list(TIME_COLUMNS)


def test_run_figures_by_hand():
    steps = with_times(pd.DataFrame({"step": [5, 6, 7]}), _log_of_three_steps())
    got = summarize(steps, duration=2.0)
    assert set(got) == set(RUN_COLUMNS) and got["num_steps"] == 2
    assert math.isclose(got["step_ms"], 300.0) and math.isclose(got["step_sync_ms"], 125.0)
    assert math.isclose(got["step_kv_ms"], 75.0) and math.isclose(got["step_launch_ms"], 25.0)
    assert math.isclose(got["host_ms_per_step"], 175.0)  # (0.2 - 0.05 + 0.4 - 0.2) / 2
    assert math.isclose(got["step_gpu_ms"], 160.0)  # (0.12 + 0.20) / 2
    assert math.isclose(got["gpu_busy_frac"], 0.16) and math.isclose(got["in_step_frac"], 0.3)
    untimed = summarize(with_times(pd.DataFrame({"step": [5]}), KVLog()), duration=2.0)
    assert all(math.isnan(v) for v in untimed.values())


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_on_a_gpu_events_time_every_step_including_chunks_that_sync_nothing(async_scheduling):
    """Every step's device time is measured, and the device's spans (one stream: they never overlap) fit in the run.
    Stepping synchronously, each span also fits in its step: the device works between the step's first launch and
    its one sync. Scheduled asynchronously, a step returns before its kernels finish (the next step's host work
    overlaps them), so only the run's elapsed time bounds them."""
    import time

    from harness.models.make_model import ensure_model

    cfg = PagedConfig(max_num_batched_tokens=256, max_num_seqs=8, gpu_memory_utilization=0.3,
                      async_scheduling=async_scheduling)
    engine = create_engine(ensure_model("qwen3-0.6b"), cfg)
    reqs = [Request(f"g{i}", list(range(5, 900 + i)), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
            for i in range(4)]
    start = time.perf_counter()
    engine.generate(reqs)
    elapsed = time.perf_counter() - start
    log = engine.kv_log()
    engine.close()
    assert sorted(t.step for t in log.times) == [step for step, _, _ in log.samples]
    for t in log.times:
        assert t.gpu > 0
    assert sum(t.gpu for t in log.times) <= (elapsed if async_scheduling else sum(t.wall for t in log.times))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_on_a_gpu_a_step_syncs_the_host_once_to_return_its_tokens(kind):
    """Prefills, mixed steps, graph and eager decodes, greedy and sampled rows: the only synchronizing CUDA call in a
    step is the one that brings the sampled tokens back (torch's sync debug mode reports every other)."""
    import warnings

    from harness.models.make_model import ensure_model

    cfg = (PagedConfig if kind == "paged" else ContiguousConfig)(
        max_num_batched_tokens=512, max_num_seqs=16, cuda_graph_max_batch=8, gpu_memory_utilization=0.3)
    engine = create_engine(ensure_model("qwen3-0.6b"), cfg)
    for i in range(12):  # more decodes than graphs capture at the start, fewer at the end: both paths
        params = SamplingParams(max_tokens=8 + 4 * i, temperature=0.7 * (i % 2), top_k=20 * (i % 3), top_p=0.9,
                                seed=i, ignore_eos=True)
        engine.add_request(Request(f"s{i}", list(range(7, 300 + 20 * i)), params))
    syncs_per_step = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while engine.has_unfinished():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            syncs_per_step.append(sum("synchronizing" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        engine.close()
    assert len(syncs_per_step) > 20
    assert max(syncs_per_step) <= 1, f"steps with more than one host sync: {syncs_per_step}"


@pytest.mark.gpu
def test_on_a_gpu_the_warm_up_leaves_the_allocator_ready_for_a_full_budget_step():
    """A first cudaMalloc mid-run syncs the host (and lands on whichever engine runs first in a process): the
    warm-up runs a step as large as the token budget, so a run's largest step allocates no new device memory."""
    from harness.models.make_model import ensure_model

    cfg = PagedConfig(max_num_batched_tokens=4096, max_model_len=1024, max_num_seqs=32, gpu_memory_utilization=0.5)
    engine = create_engine(ensure_model("qwen3-0.6b"), cfg)
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    for i in range(8):  # 8 x 512 tokens: one full-budget prefill, then decodes
        engine.add_request(Request(f"f{i}", [(11 * j + i) % 997 for j in range(512)],
                                   SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    grown = torch.cuda.memory_stats()["segment.all.allocated"] - segments
    engine.close()
    assert grown == 0, f"the run allocated {grown} new device memory segments"


def test_the_cost_benchmark_times_every_mode_alike_and_writes_its_steps(tmp_path, capsys):
    from benchmarks import step_anatomy

    out = tmp_path / "cost.csv"
    assert step_anatomy.main(["--preset", "tiny-qwen3", "--running", "3", "--blocks", "1", "--block-steps", "4",
                              "--prompt", "16", "--engines", "paged", "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert rows.groupby("anatomy").size().to_dict() == {"host": 4, "off": 4, "on": 4}
    assert "on / off - 1" in capsys.readouterr().out
    prims = step_anatomy.primitives(torch.device("cpu"), repeats=200)
    assert prims["lap"] > 0 and prims["empty step (2 marks)"] > prims["lap"]


@pytest.mark.parametrize("max_model_len", [8, 9, 64])
def test_the_warm_up_runs_on_any_engine_a_config_allows(model_dir, max_model_len):
    """Even one too short to hold a warm-up prompt; it leaves nothing running and no counters behind."""
    # a small GPU budget: zeroing 90% of an H100 as KV took ~45 s a case (the CPU budget is its own setting)
    engine = create_engine(model_dir, PagedConfig(max_model_len=max_model_len, block_size=4, max_num_seqs=8,
                                                  gpu_memory_utilization=0.2))
    try:
        engine._warm_up()  # on a GPU the constructor runs it
        stats = engine.kv_stats()
        assert not engine.has_unfinished() and stats.allocated == 0 and stats.num_preemptions == 0
        assert engine.kv_log().samples == []
    finally:
        engine.close()
