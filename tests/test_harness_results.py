"""A run directory is complete or recognisably unfinished, whenever the writer stops; runs are read in job order."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.bench.results import METADATA, find_runs, write_run

ROW = {"engine": "paged", "output_tok_s": 1.0}
REQUESTS = pd.DataFrame({"request_id": ["a", "b"], "output_tokens": [4, 4], "token_times_s": [[0.1] * 4, [0.2] * 4]})


def unfinished_dir(tmp_path, name="0_engine=paged"):
    run_dir = tmp_path / name
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra leaves a job's folder before the job writes anything
    return run_dir


def test_a_writer_stopped_midway_leaves_no_file_half_written_and_the_run_unfinished(tmp_path, monkeypatch):
    run_dir = unfinished_dir(tmp_path)
    to_parquet = pd.DataFrame.to_parquet

    def killed_while_writing_requests(self, path, *args, **kwargs):
        if "requests" in str(path):
            path.write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt
        return to_parquet(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", killed_while_writing_requests)
    with pytest.raises(KeyboardInterrupt):
        write_run(run_dir, ROW, {"status": "ok"}, REQUESTS)
    assert not (run_dir / "requests.parquet").exists() and not (run_dir / METADATA).exists()
    assert (run_dir / "run.parquet").is_file()  # complete files are there, but no metadata.json: unfinished
    runs, unfinished = find_runs([tmp_path])
    assert runs == [] and unfinished == [run_dir]


def test_a_run_written_again_replaces_every_file_of_the_old_one(tmp_path):
    run_dir = unfinished_dir(tmp_path)
    write_run(run_dir, ROW, {"status": "ok"}, REQUESTS, pd.DataFrame({"t_s": [0.0]}))
    assert {p.name for p in run_dir.iterdir()} >= {"run.parquet", "requests.parquet", "requests.csv", "kv_steps.csv", METADATA}
    write_run(run_dir, {**ROW, "output_tok_s": None}, {"status": "failed", "reason": "boom"})
    assert {p.name for p in run_dir.iterdir()} == {".hydra", "run.parquet", "run.csv", METADATA}  # no stale tables, no temp files
    assert json.loads((run_dir / METADATA).read_text())["status"] == "failed"
    assert pd.read_parquet(run_dir / "run.parquet")["output_tok_s"].isna().all()
    assert "token_times_s" not in pd.read_csv(tmp_path / "0_engine=paged" / "run.csv").columns


def test_runs_are_found_in_job_order_not_text_order(tmp_path):
    for name in ("10_engine=paged", "2_engine=hf", "1_engine=contiguous"):
        write_run(tmp_path / name, ROW, {"status": "ok"})
    unfinished_dir(tmp_path, "11_engine=hf")
    unfinished_dir(tmp_path, "3_engine=hf")
    runs, unfinished = find_runs([tmp_path])
    assert [r.path.name for r in runs] == ["1_engine=contiguous", "2_engine=hf", "10_engine=paged"]
    assert [p.name for p in unfinished] == ["3_engine=hf", "11_engine=hf"]
