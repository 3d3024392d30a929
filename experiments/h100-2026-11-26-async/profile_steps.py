"""Where the device's time goes in steady decode: ``python3 profile_steps.py PRESET RUNNING CONTEXT STEPS``.

Builds the paged engine (random weights), brings RUNNING requests of CONTEXT prompt tokens to decoding, then
profiles a few engine calls of STEPS decode steps each with torch.profiler, and prints the device time by kernel
(top 25) and by group (attention, GEMM, sampling, elementwise, copies)."""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from engines import create_engine
from engines.config import PagedConfig
from engines.request import Request, SamplingParams
from harness.make_model import ensure_model

preset, running, context, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = PagedConfig(max_num_seqs=running, max_model_len=context + 2048, num_scheduler_steps=steps,
                  enable_prefix_caching=False, gpu_memory_utilization=0.85)
engine = create_engine(ensure_model(preset, weights=False), cfg)
vocab = engine.model_config.vocab_size
for i in range(running):
    engine.add_request(Request(f"p{i}", [(31 * j + 7 * i) % vocab for j in range(context)],
                               SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True, detokenize=False)))
while engine.scheduler.waiting or any(not s.is_decoding for s in engine.scheduler.running):
    engine.step()
for _ in range(5):
    engine.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
groups = defaultdict(float)
rows = []
for e in prof.key_averages():
    t = e.self_device_time_total
    if t <= 0:
        continue
    name = e.key
    low = name.lower()
    g = ("attention" if "decode" in low or "prefill" in low or "merge" in low else
         "gemm" if any(k in low for k in ("gemm", "sm90", "cutlass", "nvjet", "matmul", "xmma")) else
         "sampling" if any(k in low for k in ("argmax", "reduce", "topk", "sort", "softmax", "exponential")) else
         "copy" if "copy" in low or "memcpy" in low or "memset" in low else
         "norm/rope/act" if any(k in low for k in ("rms", "rotary", "silu", "norm")) else "other")
    groups[g] += t
    rows.append((t, e.count, name[:100]))
total = sum(groups.values())
print(f"{preset} running={running} context={context} steps/call={steps}: device time {total / 1e3:.1f} ms over 4 calls")
for g, t in sorted(groups.items(), key=lambda x: -x[1]):
    print(f"  {g:14s} {t / 1e3:9.2f} ms  {100 * t / total:5.1f}%")
for t, n, name in sorted(rows, reverse=True)[:25]:
    print(f"  {t / 1e3:9.2f} ms {n:6d}x  {name}")
engine.close()
