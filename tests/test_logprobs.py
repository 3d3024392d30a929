"""Logprobs of sampled tokens (SamplingParams.logprobs): equal to transformers' log_softmax of the same position's
logits in float32, raw or after temperature (engine.logprobs_mode), on every path a token can be sampled on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig
from engines.request import MAX_LOGPROBS, Request, RequestError, SamplingParams
from engines.sampling import Sampler

TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("tiny-qwen3")


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(hf, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """log_softmax over the vocabulary at each output token's position [len(output), V], logits / temperature."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1 : len(prompt) + len(output) - 1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def run(model_dir, cfg, requests):
    engine = create_engine(model_dir, cfg)
    outs: dict[tuple[str, int], list] = {}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault((out.request_id, out.index), []).append(out)
    return outs


def check(hf, request: Request, outputs, temperature: float) -> None:
    tokens = [t for o in outputs for t in o.new_token_ids]
    logprobs = [lp for o in outputs for lp in o.logprobs]
    assert len(logprobs) == len(tokens) == request.sampling_params.max_tokens
    expected = hf_logprobs(hf, request.prompt_token_ids, tokens, temperature)
    k = request.sampling_params.logprobs
    for pos, (token, lp) in enumerate(zip(tokens, logprobs)):
        assert lp.token_id == token
        assert abs(lp.logprob - expected[pos, token].item()) < TOL, (request.request_id, pos)
        assert len(lp.top) == k
        values, ids = expected[pos].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [i for i, _ in lp.top] == ids.tolist()
        assert all(abs(v - e) < TOL for (_, v), e in zip(lp.top, values.tolist()))


def requests(n_greedy: int = 3, n_sampled: int = 3, k: int = 5, temperature: float = 0.7):
    out = []
    for i in range(n_greedy + n_sampled):
        greedy = i < n_greedy
        params = SamplingParams(max_tokens=6 + i, temperature=0.0 if greedy else temperature, seed=i,
                                ignore_eos=True, logprobs=(k + i) % (MAX_LOGPROBS + 1))
        out.append(Request(f"r{i}", [(13 * j + 5 * i) % 900 + 3 for j in range(5 + 7 * i)], params))
    return out


@pytest.mark.parametrize("cfg", [
    PagedConfig(dtype="float32", block_size=4, num_blocks=512),
    PagedConfig(dtype="float32", block_size=4, num_blocks=512, num_scheduler_steps=4, async_scheduling=False),  # several tokens per call
    ContiguousConfig(dtype="float32", reservation="oracle", num_kv_slots=600, max_num_batched_tokens=16, max_num_seqs=8),  # chunked
], ids=["paged", "paged-multistep-sync", "contiguous-chunked"])
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_logprobs_equal_transformers_log_softmax(model_dir, hf, cfg, mode):
    reqs = requests()
    outs = run(model_dir, dataclasses.replace(cfg, logprobs_mode=mode), reqs)
    for r in reqs:
        t = r.sampling_params.temperature
        check(hf, r, outs[(r.request_id, 0)], t if mode == "processed" and t > 0 else 1.0)


def test_parallel_samples_each_get_their_logprobs(model_dir, hf):
    r = Request("p", list(range(3, 40)), SamplingParams(max_tokens=5, temperature=0.8, seed=3, n=3, logprobs=2,
                                                         ignore_eos=True))
    outs = run(model_dir, PagedConfig(dtype="float32", block_size=4, num_blocks=512), [r])
    assert len(outs) == 3
    for i in range(3):
        check(hf, r, outs[("p", i)], 1.0)


def test_no_logprobs_asked_costs_nothing(model_dir, monkeypatch):
    """Without a row asking, the sampler computes no log-probabilities and outputs carry none."""
    def refuse(*args, **kwargs):
        raise AssertionError("logprobs computed that no request asked for")
    monkeypatch.setattr(Sampler, "logprobs", refuse)
    reqs = [dataclasses.replace(r, sampling_params=dataclasses.replace(r.sampling_params, logprobs=None))
            for r in requests()]
    outs = run(model_dir, PagedConfig(dtype="float32", block_size=4, num_blocks=512), reqs)
    assert all(o.logprobs is None for outputs in outs.values() for o in outputs)


def test_a_batch_mixing_requests_with_and_without_logprobs(model_dir, hf):
    reqs = requests(2, 2)
    plain = [dataclasses.replace(r, request_id=f"plain{i}", sampling_params=dataclasses.replace(
        r.sampling_params, logprobs=None)) for i, r in enumerate(requests(2, 1))]
    outs = run(model_dir, PagedConfig(dtype="float32", block_size=4, num_blocks=512), reqs + plain)
    for r in reqs:
        check(hf, r, outs[(r.request_id, 0)], 1.0)
    assert all(o.logprobs is None for r in plain for o in outs[(r.request_id, 0)])


@pytest.mark.parametrize("k", [-1, MAX_LOGPROBS + 1, 2.0, True])
def test_logprobs_out_of_range_are_refused(k):
    with pytest.raises(RequestError, match="logprobs must be an integer"):
        SamplingParams(logprobs=k)


def test_a_bad_logprobs_mode_is_refused_at_start(model_dir):
    with pytest.raises(ValueError, match="logprobs_mode must be raw or processed"):
        create_engine(model_dir, PagedConfig(logprobs_mode="softmax"))


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """log_softmax at positions 0..P-2, which score prompt tokens 1..P-1 [P-1, V]."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_prompt(hf, request: Request, first) -> None:
    prompt, k = request.prompt_token_ids, request.sampling_params.prompt_logprobs
    got = first.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    expected = hf_prompt_logprobs(hf, prompt)
    for pos, lp in enumerate(got[1:]):
        assert lp.token_id == prompt[pos + 1]
        assert abs(lp.logprob - expected[pos, prompt[pos + 1]].item()) < TOL, (request.request_id, pos)
        values, ids = expected[pos].topk(k)
        assert [i for i, _ in lp.top] == ids.tolist()
        assert all(abs(v - e) < TOL for (_, v), e in zip(lp.top, values.tolist()))


@pytest.mark.parametrize("cfg, preempts", [
    (PagedConfig(dtype="float32", block_size=4, num_blocks=512, max_num_batched_tokens=64, max_num_seqs=8), False),  # chunks; the prefix cache on
    (PagedConfig(dtype="float32", block_size=4, num_blocks=90, max_num_batched_tokens=48, max_num_seqs=8), True),  # recomputes
    (ContiguousConfig(dtype="float32", reservation="oracle", num_kv_slots=2000), False),  # a 300-token prompt: two slices of rows
], ids=["paged-chunked", "paged-preempted", "contiguous"])
def test_prompt_logprobs_equal_transformers_log_softmax(model_dir, hf, cfg, preempts):
    shared = [(7 * j) % 900 + 3 for j in range(24)]  # a prefix the second request would find cached
    prompts = [shared + [5, 6, 7], shared + [8, 9] * 20, [11], [(3 * j) % 800 + 2 for j in range(300)]]
    reqs = [Request(f"e{i}", p, SamplingParams(max_tokens=12 + 2 * i, temperature=0, ignore_eos=True,
                                               prompt_logprobs=i % 3, logprobs=1, n=2 if i == 1 else 1))
            for i, p in enumerate(prompts)]
    engine = create_engine(model_dir, cfg)
    outs: dict[tuple[str, int], list] = {}

    def step() -> None:
        for out in engine.step():
            outs.setdefault((out.request_id, out.index), []).append(out)
    for r in reqs:
        engine.add_request(r)
        step()  # one at a time into the batch: the first publishes the shared prefix before the second
    while engine.has_unfinished():
        step()
    for r in reqs:
        for i in range(r.sampling_params.n):
            firsts = [o for o in outs[(r.request_id, i)] if o.prompt_logprobs is not None]
            assert len(firsts) == 1 and firsts[0] is outs[(r.request_id, i)][0]
            check_prompt(hf, r, firsts[0])
            check(hf, r, outs[(r.request_id, i)], 1.0)
    assert (engine.scheduler.num_preemptions > 0) == preempts


@pytest.mark.parametrize("name", ["hf", "hf_paged"])
def test_the_transformers_baselines_refuse_logprobs_rather_than_drop_them(model_dir, name):
    from engines.config import ENGINE_CONFIGS

    engine = create_engine(model_dir, ENGINE_CONFIGS[name]())
    try:
        for params in (SamplingParams(logprobs=1), SamplingParams(prompt_logprobs=0)):
            with pytest.raises(RequestError, match=f"engine {name} does not compute"):
                engine.add_request(Request("x", [5, 6, 7], params))
    finally:
        engine.close()  # hf_paged runs transformers' generation thread, which would keep the process alive
