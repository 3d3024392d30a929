"""Our decoder against transformers on the same directories, and the loader's errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engines.kv.metadata import StepSequence, build_metadata
from engines.model.config import ModelLoadError
from engines.model.loader import load_model
from engines.model.reference import greedy_generate
from harness.models.make_model import make_model

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


def our_logits(model, ids: torch.Tensor, block_size: int = 4) -> torch.Tensor:
    """All-position logits of one prompt, prefilled in two chunks through a shuffled paged cache."""
    n = len(ids)
    num_blocks = -(-n // block_size) + 3
    table = np.random.default_rng(0).permutation(num_blocks)[: -(-n // block_size)].astype(np.int32)
    cache = model.allocate_kv_cache(num_blocks * block_size)
    pos = np.arange(n)
    slots = table[pos // block_size] * block_size + pos % block_size
    outs = []
    for lo, hi in ((0, n // 2), (n // 2, n)):
        meta = build_metadata([StepSequence(lo, hi - lo)], slots[lo:hi], block_tables=table[None], seq_starts=None,
                              block_size=block_size, device=torch.device("cpu"))
        outs.append(model.compute_logits(model(ids[lo:hi], torch.arange(lo, hi), cache, meta)))
    return torch.cat(outs)


@pytest.mark.parametrize("preset", FAMILIES)
def test_logits_match_transformers(tiny_model, preset):
    path = tiny_model(preset)
    ours = load_model(path, dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (45,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids[None]).logits[0]
        got = our_logits(ours, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"{preset}: relative error {rel:.2e}"


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_greedy_matches_transformers_generate(tiny_model, preset):
    path = tiny_model(preset)
    ours = load_model(path, dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for seed in range(3):
        prompt = torch.randint(0, 1000, (7 + 5 * seed,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = theirs.generate(prompt[None], max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert greedy_generate(ours, prompt.tolist(), 24) == ref[0, len(prompt):].tolist()


def test_sharded_checkpoint_loads_the_same(tmp_path):
    one = make_model("tiny-llama", tmp_path / "one")
    many = make_model("tiny-llama", tmp_path / "many", shard_bytes=60_000)
    assert len(json.loads((many / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(many.glob("model-*.safetensors"))) > 2
    a, b = load_model(one), load_model(many)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


@pytest.fixture()
def model_dir(tmp_path, tiny_model):
    path = tmp_path / "model"
    shutil.copytree(tiny_model("tiny-qwen3"), path)
    return path


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_unsupported_architecture(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(model_dir)


def test_shape_mismatch_names_the_tensor(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_model(model_dir)


def test_missing_tensor_and_missing_shard(model_dir, tmp_path):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lacks weights.*down_proj"):
        load_model(model_dir)
    sharded = make_model("tiny-llama", tmp_path / "sharded", shard_bytes=60_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="shard model-00002.* is missing"):
        load_model(sharded)
