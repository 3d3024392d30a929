"""Old against new, one side per process (run from that tree's root; prints tagged lines): the serve shape's decode
step (qwen3-0.6b, bf16, ~600 context, graph replay) at 64, 32, 16 and 8 running sequences, timed by the engine's
own step anatomy (CUDA events from a step's first kernel to its last, so gaps between kernels count). One engine:
its running requests are aborted down to each size in turn.

python ab.py TAG
"""
from __future__ import annotations

import statistics
import sys

import torch

from engines import create_engine
from engines.config import PagedConfig
from engines.request import Request, SamplingParams
from harness.models.make_model import ensure_model


def engine_with(running: int, context: int):
    cfg = PagedConfig(max_num_seqs=running, max_model_len=context + 2048, enable_prefix_caching=False,
                      gpu_memory_utilization=0.85)
    return create_engine(ensure_model("qwen3-0.6b", weights=False), cfg)


def add(engine, n: int, context: int, tag: str) -> None:
    vocab = engine.model_config.vocab_size
    for i in range(n):
        engine.add_request(Request(f"{tag}{i}", [(31 * j + 7 * i + len(tag)) % vocab for j in range(context)],
                                   SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True, detokenize=False)))


def to_decoding(engine) -> None:
    while engine.scheduler.waiting or any(not s.is_decoding for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()


tag = sys.argv[1]
engine = engine_with(64, 600)
add(engine, 64, 600, "d")
to_decoding(engine)
times = engine.ledger.log.times
for running in (64, 32, 16, 8):
    for s in list(engine.scheduler.running)[running:]:
        engine.abort(s.request.request_id)
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    before = len(times)
    for _ in range(150):
        engine.step()
    torch.cuda.synchronize()
    engine.step()
    gpu = sorted(t.gpu * 1e3 for t in times[before:] if t.gpu == t.gpu)
    print(f"AB {tag} decode{running} gpu_ms median {statistics.median(gpu):.4f} p10 {gpu[len(gpu) // 10]:.4f} "
          f"p90 {gpu[9 * len(gpu) // 10]:.4f} n {len(gpu)}", flush=True)
engine.close()
