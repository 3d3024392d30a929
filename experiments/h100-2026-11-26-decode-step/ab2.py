"""Old against new, one side per process (run from that tree's root; prints tagged lines): the serve shape's decode
step (64 running, ~600 context, graph replay) and its prefill step (16 x 512 new beside 48 decodes), timed by the
engine's own step anatomy (CUDA events from a step's first kernel to its last, so gaps between kernels count).

python ab2.py TAG
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "h100-2026-11-26-roofline"))  # step_profile.py
from step_profile import add, engine_with, to_decoding  # noqa: E402

tag = sys.argv[1]
engine = engine_with(64, 600, 1)
add(engine, 64, 600, "d")
to_decoding(engine)
times = engine.ledger.log.times
before = len(times)
for _ in range(200):
    engine.step()
torch.cuda.synchronize()
engine.step()
gpu = [t.gpu * 1e3 for t in times[before:] if t.gpu == t.gpu]
print(f"AB2 {tag} decode64 gpu_ms median {statistics.median(gpu):.4f} p10 {sorted(gpu)[len(gpu) // 10]:.4f} "
      f"n {len(gpu)}", flush=True)
engine.close()

engine = engine_with(64, 600, 1, async_scheduling=False)
add(engine, 48, 600, "d")
to_decoding(engine)
times = engine.ledger.log.times
pre = []
for trial in range(5):
    add(engine, 16, 512, f"p{trial}_")
    torch.cuda.synchronize()
    n = len(times)
    engine.step()
    engine.step()
    torch.cuda.synchronize()
    engine.step()
    pre.append(times[n].gpu * 1e3)
    for s in list(engine.scheduler.running):
        if s.request.request_id.startswith(f"p{trial}_"):
            engine.abort(s.request.request_id)
    engine.step()
print(f"AB2 {tag} prefill16x512 gpu_ms " + " ".join(f"{x:.3f}" for x in pre) + f" median {statistics.median(pre[1:]):.3f}",
      flush=True)
engine.close()
