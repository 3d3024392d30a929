"""Asynchronous scheduling (engine.async_scheduling): step N+1 is scheduled and launched before step N's
tokens are read. It must change when tokens arrive, never which tokens: every output equals the synchronous
engine's, whatever stops a sample (a stop token the host has not read yet, the length limit), whatever
happens to it while its token is in flight (preemption, swap, abort), with n > 1, penalties and multi-step."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.request import FinishReason, Request, SamplingParams

N = 24


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("tiny-qwen3")


def workload(vocab: int, seed: int = 0) -> list[Request]:
    """Greedy and seeded samples that stop on frequent stop tokens (mostly before max_tokens), some with
    n = 2 or penalties (the steps that wait for their tokens), one long enough to reach the length limit."""
    rng = random.Random(seed)
    stops = list(range(3, vocab, 11))  # about one token in eleven ends a sample
    out = []
    for i in range(N):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 50))]
        params = SamplingParams(
            max_tokens=rng.randint(1, 40), temperature=0.0 if i % 3 == 0 else 0.9, seed=i,
            stop_token_ids=stops if i % 5 else [], n=2 if i % 7 == 3 else 1,
            presence_penalty=0.5 if i % 8 == 5 else 0.0,
        )
        out.append(Request(f"r{i}", prompt, params))
    return out


def run(model_dir, cfg, requests, check=True):
    """Every sample's tokens and finish reason; the KV invariants after every step; memory all free at the end."""
    engine = create_engine(model_dir, cfg)
    for r in requests:
        engine.add_request(r)
    tokens: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], FinishReason] = {}
    launches = 0
    launch = engine.runner.launch

    def counted(*args):
        nonlocal launches
        launches += 1
        return launch(*args)
    engine.runner.launch = counted
    for _ in range(5000):  # a bug that stalls the engine fails here rather than hanging
        if not engine.has_unfinished():
            break
        for out in engine.step():
            key = (out.request_id, out.index)
            assert key not in reasons, f"{key}: output after it finished"
            tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.finished:
                reasons[key] = out.finish_reason
        if check:
            engine.kv.check_invariants(engine.scheduler.live)
    assert not engine.has_unfinished(), "the engine stopped making progress"
    stats = engine.kv_stats()
    assert stats.allocated == 0 and engine.ledger.owned == 0 and engine.ledger.stored == 0
    return tokens, reasons, launches, engine


# float32: on a GPU too, where a different batch (async runs a finishing sample one step more) must not
# flip a bf16 near-tie between two engines that agree. KV memory sized here: two engines live at once.
CONFIGS = {
    "paged": PagedConfig(dtype="float32", block_size=4, num_blocks=400, max_num_seqs=8, max_num_batched_tokens=32),
    "paged-preempting": PagedConfig(dtype="float32", block_size=4, num_blocks=30, max_num_seqs=8, max_num_batched_tokens=32),
    "paged-swapping": PagedConfig(dtype="float32", block_size=2, num_blocks=60, max_num_seqs=8, max_num_batched_tokens=24,
                                  preemption_mode="swap", swap_space=0.001),
    "paged-multistep": PagedConfig(dtype="float32", block_size=4, num_blocks=400, max_num_seqs=8,
                                   num_scheduler_steps=4),
    # two-step batches in which some samples run one step: those must not draw from their generators
    "paged-multistep-preempting": PagedConfig(dtype="float32", block_size=16, num_blocks=8, max_num_seqs=8,
                                              max_num_batched_tokens=32, num_scheduler_steps=2, max_model_len=96),
    "contiguous-oracle": ContiguousConfig(dtype="float32", reservation="oracle", num_kv_slots=400, max_num_seqs=8,
                                          max_num_batched_tokens=32),
    "contiguous-max": ContiguousConfig(dtype="float32", reservation="max", max_model_len=96, num_kv_slots=400, max_num_seqs=8),
    # 65,536 slots: eight 2 MiB page groups on a GPU (a page per sequence), 4,096 groups of 16 tokens on a CPU
    "vattention": VAttentionConfig(dtype="float32", max_model_len=96, num_kv_slots=65536, max_num_seqs=8,
                                   max_num_batched_tokens=32),
    **({} if torch.cuda.is_available() else {  # 16 tokens a page: growth, preemption and pages taken back
        "vattention-preempting": VAttentionConfig(dtype="float32", max_model_len=96, num_kv_slots=128, max_num_seqs=8,
                                                  max_num_batched_tokens=32, num_scheduler_steps=2)}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_async_equals_sync(model_dir, name):
    cfg = CONFIGS[name]
    requests = workload(1000)
    sync_tokens, sync_reasons, sync_launches, sync_engine = run(
        model_dir, dataclasses.replace(cfg, async_scheduling=False), requests)
    tokens, reasons, launches, engine = run(model_dir, dataclasses.replace(cfg, async_scheduling=True), requests)
    assert tokens == sync_tokens and reasons == sync_reasons
    stopped = sum(r is FinishReason.STOP for r in reasons.values())
    assert stopped >= N // 3, "the workload must stop samples on tokens the host has not read"
    # a stop the host learns a step late costs at most one discarded step per sample, never a token
    assert sync_launches <= launches <= sync_launches + stopped
    if name == "paged-preempting":
        assert engine.scheduler.num_preemptions > 0 and sync_engine.scheduler.num_preemptions > 0


def test_tokens_arrive_one_step_late_and_length_limits_cost_nothing(model_dir):
    """Async: the step that computes a token returns before the host reads it, so each call returns the
    previous step's tokens; a sample that ends on max_tokens launches no step past it."""
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for async_on, first_outputs in ((False, 1), (True, 0)):
        engine = create_engine(model_dir, PagedConfig(block_size=4, num_blocks=64, async_scheduling=async_on))
        engine.add_request(Request("a", list(range(10)), params))
        assert len(engine.step()) == first_outputs
    tokens, reasons, launches, _ = run(model_dir, PagedConfig(block_size=4, num_blocks=64),
                                       [Request("a", list(range(10)), params)])
    assert len(tokens[("a", 0)]) == 5 and reasons[("a", 0)] is FinishReason.LENGTH and launches == 5


def test_abort_while_in_flight(model_dir):
    """A request aborted while its step runs returns only its ABORT output, and its memory is free at once."""
    engine = create_engine(model_dir, ContiguousConfig(reservation="pow2", num_kv_slots=300))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request(Request("a", list(range(20)), params))
    engine.add_request(Request("b", list(range(5, 30)), params))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None and engine._in_flight.rows
    engine.abort("a")
    after = []
    while engine.has_unfinished():
        after += engine.step()
    from_a = [o for o in after if o.request_id == "a"]
    assert [(o.new_token_ids, o.finish_reason) for o in from_a] == [([], FinishReason.ABORT)]
    assert sum(len(o.new_token_ids) for o in after if o.request_id == "b") == 30 - 3 + 1  # 3 steps, 1 token read
    assert engine.kv_stats().allocated == 0
