"""Which step of a seed_8b-like run blocks its host, and in what: each eager step profiled (cProfile), with the
allocator's new segments; the slowest one's hottest calls printed. Usage: python stall.py ENGINE [ENGINE...]"""

import cProfile
import io
import os
import pstats
import sys
import time

import torch

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig
from engines.request import Request, SamplingParams
from harness.engine_keeper import freeze_heap
from harness.job import resolve_model_dir
from harness.schema import ModelSpec



def segments() -> int:
    return torch.cuda.memory_stats()["segment.all.allocated"] if torch.cuda.is_available() else 0


for kind in sys.argv[1:]:
    cfg = (PagedConfig(enable_prefix_caching=False) if kind == "paged" else ContiguousConfig())
    cfg.max_model_len = 1024
    model_dir = resolve_model_dir(ModelSpec(preset=os.environ.get("PRESET", "llama-3.1-8b"), source="random"))
    engine = create_engine(model_dir, cfg)
    freeze_heap()
    sent = 0

    def send(n):
        global sent
        for _ in range(n):
            engine.add_request(Request(f"q{sent}", [(13 * j + sent) % 997 for j in range(512)],
                                       SamplingParams(max_tokens=128, temperature=0, ignore_eos=True, detokenize=False)))
            sent += 1

    send(32)
    worst = (0.0, None, None)
    step = 0
    while engine.has_unfinished():
        eager = any(not s.is_decoding for s in engine.scheduler.running) or bool(engine.scheduler.waiting)
        seg = segments()
        prof = cProfile.Profile() if eager else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        outs = engine.step()
        if prof:
            prof.disable()
        dt = time.perf_counter() - t0
        grown = segments() - seg
        times = engine.kv_log().times
        if eager:
            t = times[-1] if times else None
            print(f"{kind} step {step}: {dt*1e3:.1f} ms, launch {t.launch*1e3 if t else float('nan'):.1f} ms, "
                  f"sync {t.sync*1e3 if t else float('nan'):.1f} ms, new segments {grown}, running "
                  f"{len(engine.scheduler.running)}")
            if t and t.launch > worst[0]:
                worst = (t.launch, step, prof)
        finished = sum(o.finished for o in outs)
        if sent < 96:
            send(min(finished, 96 - sent))
        step += 1
    print(f"{kind}: the slowest launch, step {worst[1]} ({worst[0]*1e3:.1f} ms): hottest calls by cumulative time")
    text = io.StringIO()
    pstats.Stats(worst[2], stream=text).sort_stats("cumtime").print_stats(30)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
    engine.close()
    del engine
