"""Tensor parallelism on a CPU (gloo): two processes give the tokens of one, token for token; a dead worker is a clean
engine error (and a 503 from the server), never a hang; sizes that cannot work are refused at start-up."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import threading
import time
from datetime import timedelta

import httpx
import pytest
import torch
import torch.distributed as dist

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.model.loader import load_model
from engines.model.reference import forward_once
from engines.request import Request, SamplingParams
from engines.tensor_parallel.driver import ShardedModel, WorkerFailed, worker_devices

FAMILIES = ["tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-mistral-sw"]  # tiny-mistral-sw: a 64-token window


def workload(n: int = 10, seed: int = 0, sampled: bool = False, prefix: str = "r") -> list[Request]:
    """Greedy requests, or (``sampled``) three seeded samples each."""
    rng = random.Random(seed)
    params = lambda i: ({"temperature": 0.8, "seed": 100 + i, "n": 3} if sampled else {"temperature": 0})
    return [Request(f"{prefix}{i}", [rng.randrange(1000) for _ in range(rng.randint(1, 90))],
                    SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True, **params(i))) for i in range(n)]


def generate(model_dir, cfg, requests) -> dict:
    engine = create_engine(model_dir, cfg)
    try:
        out = engine.generate(requests)
        stats = engine.kv_stats()
        assert stats.allocated == 0, "memory still held after every request finished"
        if isinstance(engine.model, ShardedModel) and cfg.name == "vattention":  # every rank mapped the same pages
            assert engine.model.mapped_pages() == [engine.runner.storage.mapped] * (cfg.tensor_parallel_size - 1)
            assert engine.runner.storage.mapped  # deferred reclamation keeps them
        return out
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("make", [
    lambda tp: PagedConfig(block_size=4, tensor_parallel_size=tp),
    lambda tp: ContiguousConfig(reservation="oracle", num_kv_slots=600, tensor_parallel_size=tp),
    # 8 KiB pages and no premap: sequences map pages as they grow, on every rank
    lambda tp: VAttentionConfig(device="cpu", max_model_len=256, num_kv_slots=2048, page_size_kb=8, premap=False,
                                tensor_parallel_size=tp),
], ids=["paged", "contiguous", "vattention"])
def test_two_ranks_give_the_tokens_of_one(tiny_model, preset, make):
    model_dir = tiny_model(preset)
    requests = workload()
    one = generate(model_dir, make(1), requests)
    two = generate(model_dir, make(2), requests)
    assert two == one


@pytest.mark.slow
def test_two_ranks_alike_under_swaps_forks_and_seeded_sampling(tiny_model):
    """Swapped-out blocks, copy-on-write copies of forked samples and multi-step decodes reach every rank's shard of
    the cache (a worker that missed one would read other K/V and sample other tokens)."""
    model_dir = tiny_model("tiny-qwen3")
    requests = workload(12, seed=1, sampled=True, prefix="s") + workload(6, seed=2)

    def cfg(tp: int) -> PagedConfig:
        return PagedConfig(block_size=4, num_blocks=64, preemption_mode="swap", swap_space=0.01, max_num_seqs=16,
                           num_scheduler_steps=3, tensor_parallel_size=tp)

    one = generate(model_dir, cfg(1), requests)
    two = generate(model_dir, cfg(2), requests)
    assert two == one


def test_shard_logits_match_the_whole_model(tiny_model):
    """The forward of two shards, joined by all-reduces and a gathered LM head, is the model's within float error."""
    model_dir = tiny_model("tiny-qwen2")  # q/k/v biases: column-parallel biases are split too
    ids = [random.Random(3).randrange(1024) for _ in range(50)]
    whole = load_model(model_dir)
    expected = forward_once(whole, whole.allocate_kv_cache(len(ids)), ids, 0)
    sharded = ShardedModel(str(model_dir), size=2, dtype="auto", device=torch.device("cpu"), attn_backend="auto",
                           timeout_s=60)
    try:
        assert sharded.num_kv_heads == whole.cfg.num_kv_heads // 2
        got = forward_once(sharded, sharded.allocate_kv_cache(len(ids)), ids, 0)
    finally:
        sharded.close()
    assert got.shape == expected.shape == (whole.cfg.vocab_size,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])  # tied embeddings, and an LM head of its own
def test_a_vocabulary_that_does_not_split_evenly_is_padded(preset, tmp_path):
    """1,021 tokens over 2 ranks: 511 rows each, the last rank's extra row zero and its logit dropped."""
    import dataclasses

    from harness.models.make_model import make_model
    from harness.models.presets import get_preset

    base = get_preset(preset)
    odd = dataclasses.replace(base, name=f"{preset}-odd", config={**base.config, "vocab_size": 1021})
    model_dir = make_model(odd, tmp_path / "odd", dtype="float32", device="cpu")
    ids = [random.Random(4).randrange(1021) for _ in range(40)] + [1020, 0, 510, 511]  # both ranks' edges
    whole = load_model(model_dir)
    expected = forward_once(whole, whole.allocate_kv_cache(len(ids)), ids, 0)
    sharded = ShardedModel(str(model_dir), size=2, dtype="auto", device=torch.device("cpu"), attn_backend="auto",
                           timeout_s=60)
    try:
        assert sharded.local.embed_tokens.rows == 511
        got = forward_once(sharded, sharded.allocate_kv_cache(len(ids)), ids, 0)
    finally:
        sharded.close()
    assert got.shape == (1021,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def stepping(tiny_model, n: int = 4):
    """A paged tiny-qwen3 engine at TP 2 with ``n`` requests and its first step taken."""
    engine = create_engine(tiny_model("tiny-qwen3"), PagedConfig(tensor_parallel_size=2))
    for r in workload(n):
        engine.add_request(r)
    engine.step()
    return engine


@pytest.mark.parametrize("inside_a_step", [False, True], ids=["between-steps", "inside-a-step"])
def test_a_killed_worker_is_an_engine_error_not_a_hang(tiny_model, inside_a_step):
    """Killed between steps, or right after it was sent a forward (rank 0's collectives then wait on a dead peer, and
    the next message finds its pipe closed): either way the group fails, and closing does not wait on the dead rank."""
    engine = stepping(tiny_model)
    try:
        sharded = engine.model
        (worker,) = sharded._procs
        if inside_a_step:
            send = sharded._send

            def send_then_kill(msg):
                send(msg)
                sharded._send = send
                os.kill(worker.pid, signal.SIGKILL)

            sharded._send = send_then_kill
        else:
            os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerFailed, match=r"worker rank 1 exited with code -9"):
            while engine.has_unfinished():
                engine.step()
        assert time.monotonic() - start < 30
        with pytest.raises(WorkerFailed, match="rank 1"):  # and every later call, at once
            engine.step()
    finally:
        start = time.monotonic()
        engine.close()
        assert time.monotonic() - start < 15


def test_a_worker_lost_before_it_joins_the_group_is_an_error_at_once():
    """Rank 0 joins the group once every worker has said on the store that it is joining: a worker lost before then
    is an error at once (the group's rendezvous would wait the whole distributed timeout for a rank that never
    comes), and rank 0 is left waiting in nothing."""
    ctx = mp.get_context("spawn")
    worker = ctx.Process(target=os._exit, args=(3,))  # started, then gone before it joined
    worker.start()
    worker.join()
    conn, theirs = ctx.Pipe()
    theirs.close()
    sharded = ShardedModel.__new__(ShardedModel)
    sharded._procs, sharded._conns, sharded._started, sharded._lock = [worker], [conn], [True], threading.Lock()
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False)
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"worker rank 1 exited with code 3 \(before it joined the group\)"):
        sharded._join_group(store, "gloo", 2, timeout_s=120)
    assert time.monotonic() - start < 10
    assert not dist.is_initialized()


def test_a_worker_found_gone_by_a_send_fails_the_group(tiny_model):
    """With no watchdog to notice first, the closed pipe is how rank 0 learns: the group fails (left as it is, NCCL's
    teardown would wait on the dead rank forever), naming the worker's exit, and so does every later call."""
    engine = stepping(tiny_model)
    try:
        sharded = engine.model
        sharded._closing.set()
        sharded._watchdog.join()
        (worker,) = sharded._procs
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(WorkerFailed, match=r"worker rank 1 exited with code -9"):
            while engine.has_unfinished():
                engine.step()
        assert sharded.error is not None and "code -9" in sharded.error
        with pytest.raises(WorkerFailed, match=r"exited with code -9"):
            engine.step()
    finally:
        engine.close()


def test_a_step_in_flight_when_a_worker_dies_gives_no_tokens(tiny_model):
    """On a GPU a step whose collectives the watchdog aborted may still complete: its tokens are garbage, so reading
    them raises instead (here the step finished before the kill; its tokens must not be read either)."""
    engine = stepping(tiny_model, 2)  # asynchronous scheduling: the first step is launched and left in flight
    try:
        assert engine._in_flight is not None
        (worker,) = engine.model._procs
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(WorkerFailed, match="worker rank 1 exited with code -9"):
            engine.runner.wait(engine._in_flight)
    finally:
        engine.close()


def test_an_error_of_rank_0_mid_call_fails_the_group(tiny_model):
    """The workers may be inside collectives rank 0 will never make: every later call is an error, and closing kills
    them rather than waiting."""
    sharded = ShardedModel(str(tiny_model("tiny-qwen3")), size=2, dtype="auto", device=torch.device("cpu"),
                           attn_backend="auto", timeout_s=60)
    try:
        cache = sharded.allocate_kv_cache(64)

        def broken(*args):
            raise RuntimeError("simulated rank-0 failure")

        real, sharded.local.forward = sharded.local.forward, broken
        with pytest.raises(RuntimeError, match="simulated rank-0 failure"):
            forward_once(sharded, cache, [1, 2, 3], 0)
        sharded.local.forward = real
        with pytest.raises(WorkerFailed, match="rank 0 failed in a tensor-parallel call .* out of step"):
            forward_once(sharded, cache, [1, 2, 3], 0)
    finally:
        start = time.monotonic()
        sharded.close()
        assert time.monotonic() - start < 15


def test_a_killed_worker_makes_the_server_unhealthy(start_server):
    server = start_server(PagedConfig(num_kv_slots=2048, max_model_len=512, tensor_parallel_size=2))
    engine = server.state.engine
    body = {"model": "tiny-qwen3", "prompt": [5, 6, 7], "max_tokens": 8}
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        assert c.post("/v1/completions", json=body).status_code == 200
        os.kill(engine.model._procs[0].pid, signal.SIGKILL)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and "worker rank 1" in r.text
        assert c.get("/health").status_code == 503


def test_sizes_that_cannot_work_are_refused_at_start_up(tiny_model, monkeypatch):
    model_dir = tiny_model("tiny-qwen3")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the model's 2 KV heads"):
        create_engine(model_dir, PagedConfig(tensor_parallel_size=4))
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's 4 query heads"):
        create_engine(model_dir, PagedConfig(tensor_parallel_size=3))
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        create_engine(model_dir, PagedConfig(tensor_parallel_size=0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 from cuda:0 needs 2 CUDA devices, 1 are visible"):
        worker_devices(torch.device("cuda", 0), 2)
    assert worker_devices(torch.device("cpu"), 2) == [torch.device("cpu")] * 2


def test_kv_memory_is_reported_per_gpu_and_in_total(tiny_model):
    engine = create_engine(tiny_model("tiny-qwen3"), PagedConfig(tensor_parallel_size=2, kv_budget_gb=0.01))
    try:
        mem = engine.tensor_parallel()
    finally:
        engine.close()
    one = create_engine(tiny_model("tiny-qwen3"), PagedConfig(kv_budget_gb=0.01))
    # each rank holds half the KV heads: the same budget per device holds twice the tokens
    assert mem["kv_token_slots"] == pytest.approx(2 * one.kv.capacity, abs=one.kv.block_size)
    assert mem["kv_gib_per_gpu"] == pytest.approx(0.01, rel=0.02)
    assert mem["kv_gib_total"] == pytest.approx(2 * mem["kv_gib_per_gpu"])
    assert mem["backend"] == "gloo" and mem["all_reduce_bus_bytes_per_s"] > 0
    assert one.tensor_parallel()["kv_gib_total"] == one.tensor_parallel()["kv_gib_per_gpu"]
