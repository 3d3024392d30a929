"""What timing a step costs an engine step: ``python -m benchmarks.step_anatomy [options]``.

The step anatomy (engines.step_clock, docs/methodology.md) is on in every run, so issue 13
asks that it cost under 1% of a step. ``step()`` of an engine with ``--running`` sequences all
decoding is timed with the anatomy on and off, the settings taking turns step by step, so that
the growing context and any drift land on both; the ratio of median step times comes with a
95% bootstrap interval. Off means what ``engine.step_anatomy=false`` builds: no laps, no CUDA
events, and the KV manager handed to the scheduler and runner directly instead of through
its timing wrapper; a third mode, host, keeps the laps but records no CUDA events, which
splits the cost between the host's clock and the device's events. Prints a short table last, with the anatomy's own split of the step;
``--out`` writes the step times as CSV; ``--profile N`` prints the host's hottest functions over
N more steps of each engine (cProfile), to see what the phases are made of.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.kv_accounting import build_engine, change, fill, save_rows
from engines.request import Request, SamplingParams
from engines.step_clock import HOST_PHASES, StepClock
from harness.bench.stats import ratio_ci
from harness.common.engine import freeze_heap
from harness.models.make_model import ensure_model

MODES = ("on", "off", "host")  # host: the anatomy without CUDA events (its device spans as host wall clocks)


def set_anatomy(engine, timed_kv, mode: str) -> None:
    """Switch a built engine between what step_anatomy=true and =false build (the clock, and the KV manager its
    scheduler and runner call: timed or direct); ``host`` keeps the clock but records no CUDA events."""
    kv = timed_kv if mode != "off" else object.__getattribute__(timed_kv, "_kv")
    engine.clock.on = mode != "off"
    engine.clock.cuda = mode == "on" and engine.device.type == "cuda"
    engine.kv = engine.scheduler.kv = engine.runner.kv = kv


def step_times(engine, args: argparse.Namespace) -> tuple[dict[str, list[float]], list]:
    """Seconds per step in each mode, the modes taking turns step by step (so the context growing by a token a
    step lands on every mode alike); and the anatomies of the 'on' steps."""
    timed_kv = engine.kv
    times: dict[str, list[float]] = {m: [] for m in MODES}
    anatomies = []
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for i in range(len(MODES) * args.blocks * args.block_steps):
        mode = MODES[i % len(MODES)]
        set_anatomy(engine, timed_kv, mode)
        assert len(engine.scheduler.running) == args.running, "a sequence finished while being timed"
        sync()
        t0 = time.perf_counter()
        engine.step()  # returns after the host has this step's tokens: a device sync
        times[mode].append(time.perf_counter() - t0)
        timed = engine.kv_log().times  # drained every step: a host-only step's times are not an 'on' step's
        if mode == "on":
            anatomies += timed
    set_anatomy(engine, timed_kv, "on")
    engine.kv_log()
    return times, anatomies


def primitives(device: torch.device, repeats: int = 20000) -> dict[str, float]:
    """µs per call of what the anatomy does each step: a lap, a timed KV call beyond a direct one, and on a GPU
    the stream lookup, an event record, query and elapsed-time read; and an empty step with its two device marks."""
    clock = StepClock(device)
    noop = _Noop()
    timed = clock.timed(noop.call)

    def per_call(fn, n: int = repeats) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    def empty_step() -> None:
        clock.start()
        for phase in ("schedule", "kv", "prepare"):
            clock.lap(phase)
        clock.begin()
        clock.end()
        clock.lap("launch")
        clock.lap("sync")
        clock.finish(0)

    out = {"lap": per_call(lambda: clock.lap("prepare")),
           "timed KV call - direct": per_call(lambda: timed(1)) - per_call(lambda: noop.call(1))}
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream()
        a.record(stream), b.record(stream)
        torch.cuda.synchronize()
        out.update({"current_stream": per_call(torch.cuda.current_stream), "event record": per_call(lambda: a.record(stream)),
                    "event query": per_call(b.query)})
        torch.cuda.synchronize()
        out["elapsed_time"] = per_call(lambda: a.elapsed_time(b))
    clock.start()
    out["empty step (2 marks)"] = per_call(empty_step, repeats // 10)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


class _Noop:
    def call(self, x):
        return x


def hottest(engine, steps: int, top: int = 14) -> str:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        engine.step()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in text.getvalue().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_anatomy", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-0.6b" if torch.cuda.is_available() else "tiny-qwen3")
    p.add_argument("--engines", default="contiguous,paged")
    p.add_argument("--running", default="8,256", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=8, help="steps per mode: blocks x block-steps (modes take turns)")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", type=int, default=0, help="steps to profile on the host after timing (0: none)")
    p.add_argument("--primitives", action="store_true", help="only time the anatomy's primitives")
    args = p.parse_args(argv)
    if args.primitives:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for name, us in primitives(device).items():
            print(f"{name:<24} {us:8.2f} µs")
        return 0
    model_dir = ensure_model(args.preset)
    args.settings, args.extra_steps = len(MODES), args.profile  # every sequence decodes to the end of the timing
    rows, summary = [], []
    for running in (int(r) for r in args.running.split(",")):
        args.running = running
        for kind in args.engines.split(","):
            engine = build_engine(kind, model_dir, args)
            fill(engine, args)
            freeze_heap()  # as a run or a server does once its engine is built
            engine.kv_log()
            times, anatomies = step_times(engine, args)
            on, off, host = (np.array(times[m]) * 1e3 for m in MODES)
            split = {ph: 1e3 * statistics.median(getattr(a, ph) for a in anatomies) for ph in (*HOST_PHASES, "gpu")}
            summary.append((kind, running, statistics.median(on), statistics.median(off), ratio_ci(on, off),
                            ratio_ci(host, off), split))
            if args.profile:
                print(f"\n{kind}, {running} running: the host's hottest functions over {args.profile} steps")
                print(hottest(engine, args.profile))
                for i in range(running):  # room for them: the batch is full
                    engine.abort(f"r{i}")
                engine.step()
                for i in range(16):  # prompts alone: eager steps
                    engine.add_request(Request(f"p{i}", [(7 * j + i) % 997 for j in range(args.prompt)],
                                               SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
                print(f"\n{kind}, 16 prompts of {args.prompt}: the host's hottest functions "
                      "over 3 steps")
                print(hottest(engine, 3, top=24))
            rows += [{"engine": kind, "running": running, "anatomy": m, "step": i, "step_ms": t}
                     for m, ts in zip(MODES, (on, off, host)) for i, t in enumerate(ts)]
            engine.close()
            del engine
            gc.unfreeze()
    save_rows(rows, args.out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"Step anatomy cost per step ({args.preset}, {device}, prompt {args.prompt}, "
          f"{args.blocks} x {args.block_steps} steps per setting; split: medians of the 'on' steps, ms)")
    print(f"{'engine':<11} {'running':>7} {'step ms on':>11} {'off':>8} {'on / off - 1 [95% CI]':>27} "
          f"{'host / off - 1 [95% CI]':>27}  " + " ".join(f"{ph[:8]:>8}" for ph in (*HOST_PHASES, "gpu")))
    for kind, running, med_on, med_off, r, h, split in summary:
        print(f"{kind:<11} {running:>7} {med_on:>11.3f} {med_off:>8.3f} {change(r):>27} {change(h):>27}  "
              + " ".join(f"{v:>8.3f}" for v in split.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
