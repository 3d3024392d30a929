"""``harness make-model``: real shapes, a real tokenizer, deterministic bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from engines.model.config import ModelConfig
from harness.models.make_model import ensure_model, make_model
from harness.models.presets import PRESETS, get_preset
from harness.models.tokenizer_builder import build_tokenizer

# Parameter counts of the real models these presets copy.
REAL_SIZES = {"qwen3-0.6b": 0.596e9, "llama-3.2-1b": 1.236e9, "llama-3.1-8b": 8.03e9, "mistral-7b": 7.248e9,
              "llama-2-13b": 13.016e9}


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = digest(make_model("tiny-qwen3", tmp_path / "a", seed=3))
    b = digest(make_model("tiny-qwen3", tmp_path / "b", seed=3))
    c = digest(make_model("tiny-qwen3", tmp_path / "c", seed=4))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"] and a["tokenizer.json"] == c["tokenizer.json"]


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_presets_have_the_real_parameter_count(name):
    cfg = ModelConfig.from_dict(get_preset(name).config)
    assert cfg.num_parameters() == pytest.approx(REAL_SIZES[name], rel=0.01)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.1-8b", "mistral-7b"])
def test_tokenizer_fills_the_exact_vocabulary(name):
    preset = PRESETS[name]
    tok = build_tokenizer(preset.config["vocab_size"], preset.chat)
    assert tok.get_vocab_size() == preset.config["vocab_size"]
    text = "The KV cache holds keys and values, 2048 tokens!"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    assert tok.token_to_id(preset.chat.eos[0]) >= preset.config["vocab_size"] - len(preset.chat.specials)


def test_directory_is_a_hugging_face_model(tiny_model):
    path = tiny_model("tiny-llama")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (path / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    text = tok.decode(ids)
    assert "hello" in text and text.startswith("<|begin_of_text|>")
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_ids_to_tokens(eos if isinstance(eos, int) else eos[0]) == "<|eot_id|>"


def test_ensure_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    first = ensure_model("tiny-mistral", seed=5)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("tiny-mistral", seed=5) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no half-written temp dirs


def test_cli(tmp_path):
    out = tmp_path / "m"
    done = subprocess.run([sys.executable, "-m", "harness.cli", "make-model", "--preset", "tiny-qwen2", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "make-model", "--preset", "gpt-5", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice: 'gpt-5'" in bad.stderr
