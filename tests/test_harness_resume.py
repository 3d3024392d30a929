"""What a resumed sweep continues, and which of its runs it keeps."""

from __future__ import annotations

import pytest

from harness.bench.results import write_run
from harness.bench.resume import check_sweep, differences, output_dir, reusable
from harness.common.errors import UserError

CONFIG = {"seed": 0, "repeat": 1, "repeats": 3, "resume": False, "engine": {"name": "paged", "block_size": 16},
          "workload": {"num_requests": 8, "prompt": {"value": 128}}}


def run(path, config=CONFIG, status="ok"):
    write_run(path, {"engine": "paged"}, {"status": status, "config": config})
    return path


def test_a_new_directory_unless_resuming_then_the_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_dir("multirun/smoke", "2026-01-03_00-00-00", False) == "multirun/smoke/2026-01-03_00-00-00"
    with pytest.raises(UserError, match="nothing to resume under multirun/smoke/"):
        output_dir("multirun/smoke", "2026-01-03_00-00-00", True)
    for stamp in ("2026-01-02_09-00-00", "2026-01-02_10-00-00", "2026-01-01_23-00-00"):
        (tmp_path / "multirun" / "smoke" / stamp).mkdir(parents=True)
    assert output_dir("multirun/smoke", "2026-01-03_00-00-00", True) == "multirun/smoke/2026-01-02_10-00-00"


def test_differences_name_every_nested_key_that_differs():
    changed = {**CONFIG, "engine": {"name": "paged", "block_size": 32}, "workload": {"num_requests": 8}}
    assert differences(CONFIG, changed) == ["engine.block_size: 16 -> 32", "workload.prompt: {'value': 128} -> (absent)"]
    assert differences(CONFIG, CONFIG) == []


def test_only_a_finished_ok_run_of_the_same_config_is_kept(tmp_path):
    assert not reusable(tmp_path / "0_", CONFIG)  # nothing there
    assert reusable(run(tmp_path / "1_", CONFIG), {**CONFIG, "resume": True, "repeats": 5})  # how to run is no difference
    assert not reusable(run(tmp_path / "2_", CONFIG, status="failed"), CONFIG)
    assert not reusable(run(tmp_path / "3_", CONFIG, status="skipped"), CONFIG)
    with pytest.raises(UserError, match=r"3_ finished with another config \(workload.num_requests: 8 -> 9\)"):
        reusable(tmp_path / "3_", {**CONFIG, "workload": {"num_requests": 9, "prompt": {"value": 128}}})


def test_a_resumed_sweep_refuses_finished_runs_it_does_not_ask_for(tmp_path):
    run(tmp_path / "0_engine=paged")
    run(tmp_path / "1_engine=contiguous", {**CONFIG, "engine": {"name": "contiguous"}})
    (tmp_path / "2_engine=hf" / ".hydra").mkdir(parents=True)  # unfinished: never in the way
    planned = {tmp_path / "0_engine=paged": CONFIG, tmp_path / "1_engine=contiguous": {**CONFIG, "engine": {"name": "contiguous"}},
               tmp_path / "2_engine=hf": {**CONFIG, "engine": {"name": "hf"}}}
    check_sweep(tmp_path, planned)
    with pytest.raises(UserError, match=r"1_engine=contiguous finished with another config \(engine.name: contiguous -> hf\)"):
        check_sweep(tmp_path, {tmp_path / "0_engine=paged": CONFIG, tmp_path / "1_engine=hf": {**CONFIG, "engine": {"name": "hf"}}})
    with pytest.raises(UserError, match="1_engine=contiguous is not a run of the sweep asked for now"):
        check_sweep(tmp_path, {tmp_path / "0_engine=paged": CONFIG})
