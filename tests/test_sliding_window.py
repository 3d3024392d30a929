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


def _run_checked(engine, requests, states: bool = False) -> tuple[dict, int]:
    """Every request to its end, the KV invariants after every step (``states``: and token states within the
    allocated slots, which holds without samples sharing a part-filled block); the most KV slots allocated."""
    for r in requests:
        engine.add_request(r)
    out: dict[str, dict[int, list[int]]] = {}
    most = 0
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, {}).setdefault(o.index, []).extend(o.new_token_ids)
        engine.kv.check_invariants(engine.scheduler.live)
        stats = engine.kv_stats()
        assert not states or 0 <= stats.stored <= stats.allocated, stats
        most = max(most, stats.allocated)
    assert engine.kv_stats().allocated == 0
    return out, most


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_paged_frees_the_blocks_a_window_has_left_and_stays_exact(windowed_dir, prefix_caching):
    """One 41-token prompt and 25 tokens, in 16-token chunks: without the window it would hold 17 blocks of 4."""
    model = load_model(windowed_dir, dtype="float32")
    prompt = torch.randint(0, 1000, (41,), generator=torch.Generator().manual_seed(9)).tolist()
    engine = create_engine(windowed_dir, PagedConfig(device="cpu", block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                                                     enable_prefix_caching=prefix_caching))
    out, most = _run_checked(engine, [Request("r", prompt, SamplingParams(max_tokens=25, temperature=0,
                                                                          ignore_eos=True))], states=True)
    assert out["r"][0] == greedy_generate(model, prompt, 25)
    # the window's 12 keys, a 16-token chunk, the blocks they straddle (and one published block late)
    assert most <= 4 * (-(-(WINDOW - 1 + 16) // 4) + 2) < 4 * 17


@pytest.mark.parametrize("steps", [1, 3], ids=["one-step", "multi-step"])
def test_paged_window_with_shared_prefixes_samples_and_preemption(windowed_dir, steps):
    """Prefix hits, n = 2 samples sharing blocks, and a pool small enough to preempt: invariants every step, greedy
    requests equal to one-at-a-time output."""
    model = load_model(windowed_dir, dtype="float32")
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 1000, (20,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (1, 9, 17, 30, 5, 12)]
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0 if i % 2 == 0 else 0.8, seed=i,
                                                   n=1 if i % 3 else 2, ignore_eos=True))
                for i, p in enumerate(prompts)]
    engine = create_engine(windowed_dir, PagedConfig(device="cpu", block_size=4, num_blocks=12, max_num_seqs=6,
                                                     max_num_batched_tokens=16, num_scheduler_steps=steps))
    out, _ = _run_checked(engine, requests)
    assert engine.kv_stats().num_preemptions > 0 and engine.kv.num_prefix_hits > 0
    for i, p in enumerate(prompts):
        if i % 2 == 0:
            assert all(tokens == greedy_generate(model, p, 20) for tokens in out[f"r{i}"].values()), f"r{i}"


def test_swapping_a_windowed_sequence_is_refused_at_start_up(windowed_dir):
    with pytest.raises(ValueError, match="preemption_mode=swap with a sliding-window model"):
        create_engine(windowed_dir, PagedConfig(device="cpu", preemption_mode="swap"))
