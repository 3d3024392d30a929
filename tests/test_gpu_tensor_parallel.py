"""On two GPUs of one host (NCCL): the engines at tensor parallel 2, CUDA graphs included, give one GPU's greedy tokens.

Run with ``pytest -m gpu -s tests/test_gpu_tensor_parallel.py`` to see the agreement and the all-reduce bandwidth.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import time

import pytest
import torch

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.request import Request, SamplingParams
from engines.tensor_parallel.driver import WorkerFailed
from harness.models.make_model import ensure_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

CASES = {
    "paged": lambda tp: PagedConfig(block_size=16, dtype="float32", tensor_parallel_size=tp),
    "paged-eager": lambda tp: PagedConfig(block_size=16, dtype="float32", enforce_eager=True, tensor_parallel_size=tp),
    "paged-multistep-swap": lambda tp: PagedConfig(block_size=16, dtype="float32", num_scheduler_steps=4, num_blocks=120,
                                                   preemption_mode="swap", swap_space=1.0, tensor_parallel_size=tp),
    "contiguous": lambda tp: ContiguousConfig(reservation="pow2", dtype="float32", tensor_parallel_size=tp),
    # fp32 qwen3-0.6b at TP 2: 4 KV heads a GPU, 1,024 tokens a 2 MiB page; every GPU maps its shard of each page
    "vattention": lambda tp: VAttentionConfig(dtype="float32", max_model_len=2048, tensor_parallel_size=tp),
}


def run(cfg, requests) -> tuple[dict, dict]:
    cfg.gpu_memory_utilization = 0.5
    engine = create_engine(ensure_model("qwen3-0.6b"), cfg)
    try:
        return engine.generate(requests), engine.tensor_parallel()
    finally:
        engine.close()
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("name", list(CASES))
def test_two_gpus_give_the_tokens_of_one(name):
    rng = random.Random(5)
    requests = [Request(f"r{i}", [rng.randrange(1000, 30000) for _ in range(rng.randint(1, 300))],
                        SamplingParams(max_tokens=rng.randint(1, 64), temperature=0, ignore_eos=True)) for i in range(32)]
    one, _ = run(CASES[name](1), requests)
    two, info = run(CASES[name](2), requests)
    same = sum(two[k] == one[k] for k in one)
    print(f"\n{name}: {same}/32 requests equal at TP 2 and TP 1; NCCL {info.get('nccl_version')}, all-reduce bus "
          f"bandwidth {info['all_reduce_bus_bytes_per_s'] / 1e9:.0f} GB/s; KV {info['kv_gib_per_gpu']:.2f} GiB per GPU")
    assert info["backend"] == "nccl" and info["tensor_parallel_size"] == 2
    assert same == 32


def test_closing_a_healthy_group_is_prompt():
    """Every rank leaves the NCCL group at once (rank 0 while its workers do): close() takes seconds, never the
    30 s a worker is given before it is killed."""
    engine = create_engine(ensure_model("qwen3-0.6b"), PagedConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5))
    engine.generate([Request("r", [5] * 100, SamplingParams(max_tokens=8, temperature=0))])
    (worker,) = engine.model._procs
    start = time.monotonic()
    engine.close()
    took = time.monotonic() - start
    print(f"\nclose() of a TP 2 engine (CUDA graphs, NCCL): {took:.2f} s; the worker exited with {worker.exitcode}")
    gc.collect()
    torch.cuda.empty_cache()
    assert worker.exitcode == 0, "the worker was killed, not stopped"
    assert took < 20


def test_a_killed_worker_over_nccl_is_an_engine_error_not_a_hang():
    """SIGKILL a worker right after it is told to replay a decode graph: the group is aborted (left as it is, NCCL's
    teardown waits forever for the dead rank), the engine raises WorkerFailed naming the rank, every later call raises
    at once, and close() returns."""
    engine = create_engine(ensure_model("qwen3-0.6b"), PagedConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5))
    try:
        for i in range(16):
            engine.add_request(Request(f"r{i}", [7 + i] * 200, SamplingParams(max_tokens=4000, temperature=0,
                                                                               ignore_eos=True)))
        for _ in range(20):
            engine.step()
        sharded = engine.model
        (worker,) = sharded._procs
        send = sharded._send

        def send_then_kill(msg):  # the worker dies inside a step: rank 0's collectives wait on a peer that is gone
            send(msg)
            if type(msg).__name__ == "Replay":
                sharded._send = send
                os.kill(worker.pid, signal.SIGKILL)

        sharded._send = send_then_kill
        start = time.monotonic()
        with pytest.raises(WorkerFailed, match=r"worker rank 1 exited with code -9"):
            while engine.has_unfinished():
                engine.step()
        took = time.monotonic() - start
        with pytest.raises(WorkerFailed, match="rank 1"):
            engine.step()
        print(f"\nkilled worker: WorkerFailed after {took:.2f} s")
        assert took < 30
    finally:
        start = time.monotonic()
        engine.close()
        took = time.monotonic() - start
        print(f"close() of the failed group: {took:.2f} s")
    assert took < 30
    gc.collect()
    torch.cuda.empty_cache()
