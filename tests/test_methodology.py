"""docs/methodology.md defines every column of the result tables, and the README and reports link to it."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from engines.model.config import ModelConfig
from harness.bench.app import run_app
from harness.bench.roofline import roofline
from harness.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methodology.md"
PREFIXES = ("engine.", "param.")  # defined as `engine.*` and `param.*`
STAT_SUFFIX = re.compile(r"_(mean|p50|p90|p95|p99)$")


def defined() -> set[str]:
    """Every `name` in backticks in the methodology."""
    return set(re.findall(r"`([^`\s]+)`", DOC.read_text()))


def undefined(columns) -> list[str]:
    names = defined()
    missing = []
    for column in columns:
        if column.startswith(PREFIXES):
            if f"{column.split('.')[0]}.*" not in names:
                missing.append(column)
            continue
        stat = STAT_SUFFIX.sub("_*", column)
        if column not in names and stat not in names:
            missing.append(column)
    return missing


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_model):
    tiny_model("tiny-qwen3")
    out = tmp_path_factory.mktemp("methodology") / "run"
    assert run_app(["+experiment=smoke", "engine=paged", "workload.num_requests=3", "workload.output.value=3",
                    f"hydra.run.dir={out}", "report=false"]) == 0
    return out


@pytest.mark.parametrize("table", ["run", "requests", "kv_steps"])
def test_every_column_of_a_run_is_defined(smoke_run, table):
    columns = pd.read_parquet(smoke_run / f"{table}.parquet").columns
    assert len(columns) > 5
    assert undefined(columns) == []


def test_the_gpu_only_roofline_columns_are_defined():
    cfg = ModelConfig.from_dict(get_preset("tiny-qwen3").config)
    figures = roofline(cfg, [8], [8], [4], concurrency_bound=1, measured_s=1.0, flops_per_s=1e12, bytes_per_s=1e11)
    assert undefined(list(figures) + ["peak_gpu_memory_bytes"]) == []


def test_a_check_that_can_fail():
    assert undefined(["no_such_column", "ttft_p95", "engine.block_size"]) == ["no_such_column"]


def test_the_readme_links_the_methodology():
    assert "docs/methodology.md" in (ROOT / "README.md").read_text()
