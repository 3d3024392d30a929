"""Every engine config in conf/engine/ through the real Hydra app, runner and report.

The unit tests drive engines with ``generate``; only the runner samples ``kv_stats()`` every
step, so an engine can pass them and still fail every run of the main job. One tiny run
per engine config keeps that path covered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.bench.app import CONF_DIR, run_app

ENGINE_CONFIGS = sorted(p.stem for p in (CONF_DIR / "engine").glob("*.yaml"))


def test_every_engine_config_is_covered():
    """A new engine config joins the test below by itself; this pins that the glob finds them."""
    assert {"hf", "hf_paged", "contiguous", "contiguous_pow2", "contiguous_oracle", "paged"} <= set(ENGINE_CONFIGS)


@pytest.mark.parametrize("engine", ENGINE_CONFIGS)
def test_one_tiny_job_per_engine_runs_ok(tmp_path: Path, tiny_model, start_server, engine: str) -> None:
    tiny_model("tiny-qwen3")
    run_dir = tmp_path / "run"
    target = []
    if engine == "http":  # not an engine: a server measured over HTTP, here ours serving the paged engine
        from engines.config import PagedConfig

        target = [f"engine.base_url={start_server(PagedConfig(num_kv_slots=4096, max_model_len=512)).base_url}"]
    status = run_app(["+experiment=smoke", f"engine={engine}", *target, "workload.num_requests=3",
                      "workload.prompt.value=12", "workload.output.value=5", f"hydra.run.dir={run_dir}"])
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert status == 0 and meta["status"] == "ok", meta.get("reason")
    assert meta["engine_label"] == ("paged@http" if engine == "http" else engine)
    assert meta["run"]["completed"] == 3 and meta["run"]["output_tokens"] == 15
    assert (run_dir / "report.md").is_file()
    if engine == "vattention":  # its pages and what mapping cost, in the run's metadata
        layout = meta["kv_layout"]
        assert layout["tokens_per_page"] > 0 and layout["group_maps"] >= layout["page_groups"] and layout["premap"]
