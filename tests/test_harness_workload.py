"""Workloads: lengths as configured, prompts free of special tokens, real datasets, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines.detokenizer import load_tokenizer
from harness.bench.schema import DatasetSpec, LengthDist, PrefixSpec, WorkloadSpec
from harness.bench.workload import build_workload, clipped_lognormal_mean, draw_lengths, lognormal_mu
from harness.common.engine import regular_token_ids
from harness.common.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model("tiny-qwen3"))


def _build(tokenizer, **kwargs):
    return build_workload(WorkloadSpec(**kwargs), tokenizer, 1024, 4096, seed=0)


@pytest.mark.parametrize("mean, sigma, low, high", [(161, 1.0, 4, 1024), (338, 1.0, 4, 1024), (19, 0.5, 4, 256), (58, 0.8, 4, 512)])
def test_lognormal_lengths_match_the_published_means(mean, sigma, low, high):
    mu = lognormal_mu(mean, sigma, low, high)
    assert clipped_lognormal_mean(mu, sigma, low, high) == pytest.approx(mean, rel=1e-6)
    lengths = draw_lengths(LengthDist(dist="lognormal", mean=mean, sigma=sigma, low=low, high=high), 50_000, np.random.default_rng(0))
    assert lengths.mean() == pytest.approx(mean, rel=0.02)
    assert lengths.min() >= low and lengths.max() <= high


def test_uniform_and_fixed_lengths(tokenizer):
    requests = _build(tokenizer, num_requests=200, prompt=LengthDist(dist="uniform", low=5, high=9), output=LengthDist(value=7))
    prompt_lens = {len(r.prompt_token_ids) for r in requests}
    assert prompt_lens == {5, 6, 7, 8, 9}
    assert {r.sampling_params.max_tokens for r in requests} == {7}
    assert all(r.sampling_params.ignore_eos for r in requests)


def test_text_only_when_asked(tokenizer):
    assert not any(r.sampling_params.detokenize for r in _build(tokenizer, num_requests=4))
    assert all(r.sampling_params.detokenize for r in _build(tokenizer, num_requests=4, detokenize=True))


def test_prompts_avoid_special_tokens_and_are_deterministic(tokenizer):
    special = set(tokenizer.get_added_tokens_decoder())
    regular = regular_token_ids(tokenizer, 1024)
    assert special and not special & set(regular.tolist()) and len(regular) == 1024 - len(special)
    a = _build(tokenizer, num_requests=50, prompt=LengthDist(value=64))
    b = _build(tokenizer, num_requests=50, prompt=LengthDist(value=64))
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert not special & {t for r in a for t in r.prompt_token_ids}
    other = build_workload(WorkloadSpec(num_requests=50, prompt=LengthDist(value=64)), tokenizer, 1024, 4096, seed=1)
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in other]


def test_shared_prefix_groups_and_parallel_samples(tokenizer):
    requests = _build(tokenizer, num_requests=6, prompt=LengthDist(value=5), prefix=PrefixSpec(num_groups=2, length=8), n=3)
    assert all(len(r.prompt_token_ids) == 13 and r.sampling_params.n == 3 for r in requests)
    heads = [tuple(r.prompt_token_ids[:8]) for r in requests]
    assert heads[0] == heads[2] == heads[4] and heads[1] == heads[3] == heads[5] and heads[0] != heads[1]


def test_sharegpt_file_gives_prompts_and_reply_lengths(tokenizer, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. "
    data = [{"conversations": [{"from": "human", "value": text * (i + 1)}, {"from": "gpt", "value": text * 2}]} for i in range(5)]
    data.append({"conversations": [{"from": "human", "value": "hi"}]})  # one turn: skipped
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    spec = WorkloadSpec(num_requests=5, dataset=DatasetSpec(path=str(path)))
    requests = build_workload(spec, tokenizer, 1024, 4096, 0)
    reply_len = len(tokenizer.encode(text * 2).ids)
    assert {r.sampling_params.max_tokens for r in requests} == {reply_len}
    assert sorted(len(r.prompt_token_ids) for r in requests) == sorted(len(tokenizer.encode(text * (i + 1)).ids) for i in range(5))
    with pytest.raises(UserError, match="has 5 usable prompts"):
        build_workload(WorkloadSpec(num_requests=6, dataset=DatasetSpec(path=str(path))), tokenizer, 1024, 4096, 0)


def test_jsonl_prompts_with_and_without_output_lengths(tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"Hello there, how are you?"\n{"prompt": "Tell me a story.", "output_len": 5}\n')
    requests = build_workload(WorkloadSpec(num_requests=2, output=LengthDist(value=9), dataset=DatasetSpec(path=str(path))),
                              tokenizer, 1024, 4096, 0)
    by_prompt = {tokenizer.decode(r.prompt_token_ids): r.sampling_params.max_tokens for r in requests}
    assert by_prompt == {"Hello there, how are you?": 9, "Tell me a story.": 5}


def test_a_workload_that_cannot_fit_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="exceed max_model_len 64"):
        build_workload(WorkloadSpec(num_requests=2, prompt=LengthDist(value=60), output=LengthDist(value=8)), tokenizer, 1024, 64, 0)


def test_missing_dataset_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        WorkloadSpec(dataset=DatasetSpec(path="/no/such/file.json"))
