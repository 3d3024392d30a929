"""A mixed step's host launch and device time, piecewise graphs against eager (issue 13, session 12).

The serve shape (qwen3-0.6b, 48 sequences decoding at ~600 context) takes a step of prompts: 16 x 512 (the admission
wave of the serve workload) or 1 x 512 (one arrival). A sleep kernel is queued first, so the step's launch phase is
host work alone; the step clock's device span gives its GPU time. Engines alternate: piecewise, eager, twice.
Run from the repo root: ``python3 experiments/h100-2026-11-26-piecewise/launch_ab.py [MODE...]`` (default: both).
"""

from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, "experiments/h100-2026-11-26-roofline")
from step_profile import add, engine_with, to_decoding  # noqa: E402


def trials(mode: str, prompts: int, repeats: int = 4) -> list[tuple[float, float, float]]:
    """(wall, launch, gpu) seconds of ``repeats`` steps that each admit ``prompts`` 512-token prompts."""
    engine = engine_with(64, 600, 1, async_scheduling=False, **({} if mode == "piecewise" else
                                                                  {"cuda_graph_max_tokens": 0}))
    add(engine, 48, 600, "d")
    to_decoding(engine)
    times, out = engine.ledger.log.times, []
    for trial in range(repeats):
        add(engine, prompts, 512, f"p{trial}_")
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000 // 10)  # ~100 ms of device work queued: the host runs ahead of it
        before = len(times)
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        torch.cuda.synchronize()
        engine.step()  # reads the step's device span
        st = times[before]
        out.append((wall, st.launch, st.gpu))
        for s in list(engine.scheduler.running):
            if s.request.request_id.startswith(f"p{trial}_"):
                engine.abort(s.request.request_id)
        engine.step()
    engine.close()
    return out


if __name__ == "__main__":
    modes = sys.argv[1:] or ["piecewise", "eager"]
    rows = []
    for rnd in (1, 2):
        for mode in modes:
            for prompts in (16, 1):
                for trial, (wall, launch, gpu) in enumerate(trials(mode, prompts)):
                    if trial:  # an engine's first such step warms up
                        rows.append((rnd, mode, prompts, wall, launch, gpu))
                    print(f"round {rnd} {mode:9s} {prompts:2d} x 512 + 48 decodes: step wall {wall * 1e3:7.2f} ms, "
                          f"launch {launch * 1e3:6.2f} ms, gpu {gpu * 1e3:6.2f} ms", flush=True)
    print("\n| mode | step | launch ms (host), median [min-max] | GPU ms, median [min-max] |\n| --- | --- | ---: | ---: |")
    for mode in modes:
        for prompts in (16, 1):
            sel = [r for r in rows if r[1] == mode and r[2] == prompts]
            launch = sorted(r[4] * 1e3 for r in sel)
            gpu = sorted(r[5] * 1e3 for r in sel)
            med = lambda v: v[len(v) // 2]  # noqa: E731
            print(f"| {mode} | {prompts} x 512 + 48 | {med(launch):.2f} [{launch[0]:.2f}-{launch[-1]:.2f}] | "
                  f"{med(gpu):.2f} [{gpu[0]:.2f}-{gpu[-1]:.2f}] |")
