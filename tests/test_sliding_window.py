"""Sliding-window attention (Mistral's ``sliding_window``) against transformers, on a directory transformers
writes itself, with prompts and outputs longer than the window."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.model.loader import load_model
from engines.model.reference import greedy_generate
from engines.request import Request, SamplingParams
from test_model import our_logits

WINDOW = 12


@pytest.fixture(scope="module")
def windowed_dir(tiny_model, tmp_path_factory):
    """The tiny-mistral shape with a 12-token window and fresh random weights, saved by transformers."""
    source = tiny_model("tiny-mistral")
    config = AutoConfig.from_pretrained(source)
    config.sliding_window = WINDOW
    config.initializer_range = 0.3  # peaked logits: greedy choices that float32 noise does not flip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("windowed")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="module")
def theirs(windowed_dir):
    return AutoModelForCausalLM.from_pretrained(windowed_dir, dtype=torch.float32).eval()


def test_the_directory_has_a_window_that_changes_transformers_output(windowed_dir, theirs):
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(0))
    ours = load_model(windowed_dir, dtype="float32")
    assert ours.cfg.sliding_window == WINDOW and ours.cfg.max_context > WINDOW  # no longer capped at the window
    unwindowed = AutoConfig.from_pretrained(windowed_dir)
    unwindowed.sliding_window = None
    full = AutoModelForCausalLM.from_pretrained(windowed_dir, config=unwindowed, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(theirs(ids[None]).logits[0, -1], full(ids[None]).logits[0, -1], atol=1e-3)


def test_logits_match_transformers_past_the_window(windowed_dir, theirs):
    """Every position of a 45-token prompt, prefilled in two chunks through a shuffled paged cache."""
    ours = load_model(windowed_dir, dtype="float32")
    ids = torch.randint(0, 1000, (45,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids[None]).logits[0]
        got = our_logits(ours, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_greedy_matches_transformers_generate_past_the_window(windowed_dir, theirs):
    ours = load_model(windowed_dir, dtype="float32")
    for seed in range(3):
        prompt = torch.randint(0, 1000, (5 + 11 * seed,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = theirs.generate(prompt[None], max_new_tokens=30, do_sample=False, eos_token_id=None,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert greedy_generate(ours, prompt.tolist(), 30) == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("cfg", [
    PagedConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=4),
    ContiguousConfig(reservation="oracle", num_scheduler_steps=3),
    VAttentionConfig(max_model_len=128, num_kv_slots=65536, max_num_seqs=8),  # 2 MiB pages fit on a GPU
], ids=["paged-chunked", "contiguous-multistep", "vattention"])
def test_engines_match_one_at_a_time_greedy_past_the_window(windowed_dir, cfg):
    model = load_model(windowed_dir, dtype="float32")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (3, 20, 41, 9, 33)]
    expected = [greedy_generate(model, p, 25) for p in prompts]
    engine = create_engine(windowed_dir, cfg)
    got = engine.generate([Request(f"r{i}", p, SamplingParams(max_tokens=25, temperature=0, ignore_eos=True))
                           for i, p in enumerate(prompts)])
    assert [got[f"r{i}"][0] for i in range(len(prompts))] == expected
