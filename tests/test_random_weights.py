"""``model.source=random``: a preset's weights drawn on the device at load, bit for bit make-model's files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from engines import create_engine
from engines.config import HFConfig, HFPagedConfig
from engines.model.config import ModelLoadError
from engines.model.loader import load_model
from harness.bench.app import run_app
from harness.common.errors import UserError
from harness.common.schema import ModelSpec
from harness.models.make_model import ensure_model, make_model


@pytest.fixture(scope="module")
def random_dir():
    """``random_dir(preset)`` -> the cached directory of that preset without weight files."""
    return lambda preset="tiny-qwen3": ensure_model(preset, weights=False)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])  # tiny-qwen3 ties its embeddings
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_drawn_weights_equal_the_written_ones(tiny_model, random_dir, preset, dtype):
    written = load_model(tiny_model(preset), dtype=dtype).state_dict()
    drawn = load_model(random_dir(preset), dtype=dtype).state_dict()
    assert written.keys() == drawn.keys()
    differ = [name for name in written if not torch.equal(written[name], drawn[name])]
    assert not differ, differ


def test_the_random_directory_has_no_weight_files_and_says_so(tiny_model, random_dir):
    path = random_dir("tiny-qwen3")
    assert path != tiny_model("tiny-qwen3") and "-random-" in path.name
    assert not list(path.glob("*.safetensors*"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["kvbench_weights"] == "random" and config["kvbench_preset"] == "tiny-qwen3"
    assert config["kvbench_seed"] == 0 and config["kvbench_init_device"] in ("cpu", "cuda") and config["kvbench_init_std"] > 0
    assert "drawn on the device at load" in (path / "README.md").read_text()
    assert ensure_model("tiny-qwen3", weights=False) == path  # cached
    assert "kvbench_weights" not in json.loads((tiny_model("tiny-qwen3") / "config.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device draws what the directory records")
def test_weights_recorded_as_drawn_on_cuda_are_refused_without_one(tmp_path):
    path = make_model("tiny-qwen3", tmp_path / "m", device="cpu", weights=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "kvbench_init_device": "cuda"}))
    with pytest.raises(ModelLoadError, match="drawn on cuda"):
        load_model(path)


def test_a_paged_run_on_random_weights(in_process):
    args = ["+experiment=smoke", "workload.num_requests=4", "workload.output.value=4", "engine=paged",
            "model.source=random", "report=false", "hydra.run.dir=run"]
    assert run_app(args) == 0
    row = pd.read_parquet(in_process / "run" / "run.parquet").iloc[0]
    assert row["status"] == "ok" and row["model_source"] == "random" and row["completed"] == 4
    meta = json.loads((in_process / "run" / "metadata.json").read_text())
    assert meta["model_source"] == "random" and "-random-" in meta["model_dir"]


@pytest.mark.parametrize("fields, needle", [
    ({"source": "disk"}, "model.source must be one of files, random, got 'disk'"),
    ({"source": "random", "path": "."}, "model.source=random draws a preset's weights; model.path names a directory of files"),
])
def test_bad_sources_are_user_errors(fields, needle):
    with pytest.raises(UserError, match=needle):
        ModelSpec(preset="tiny-qwen3", **fields)


@pytest.mark.parametrize("cfg", [HFConfig(), HFPagedConfig()])
def test_transformers_engines_refuse_random_weights(random_dir, cfg):
    with pytest.raises(ValueError, match=f"engine {cfg.name} loads weights with transformers from safetensors; "
                                         "model.source=random has none: use model.source=files"):
        create_engine(random_dir("tiny-qwen3"), cfg)


def test_the_app_reports_a_transformers_engine_on_random_weights_as_one_line(in_process, capsys):
    assert run_app(["+experiment=smoke", "engine=hf", "model.source=random"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: engine hf: engine hf loads weights with transformers"), err
