"""What measuring KV memory costs an engine step: ``python -m benchmarks.kv_accounting [options]``.

Every step our engines log their KV counters after the step's admissions and every change
of a sequence's allocation (engines.kv.accounting); issue 11 asks that this cost under 1%
of a step at 256 running requests, the same for paging and contiguous KV. Two measurements:

- the recording itself, timed in isolation: one ``kv_stats()`` + ``ledger.sample`` (what
  every step pays) and one ``ledger.hold`` (what each allocation change pays) in µs, with the
  allocation changes per step the run actually logged;
- end to end: ``step()`` of an engine with ``--running`` sequences all decoding, with the
  log on and off (``record_kv_steps``) in interleaved blocks of steps, so that the growing
  context and any drift land on both; the ratio of median step times with a 95% bootstrap interval.

The counters themselves are kept either way (the server's metrics read them); what the
switch turns off is the log. Prints a short table last; ``--out`` writes the step times as CSV.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig
from engines.request import Request, SamplingParams
from harness.bench.stats import ratio_ci
from harness.models.make_model import ensure_model


def build_engine(kind: str, model_dir: Path, args: argparse.Namespace):
    """Synchronous scheduling: a timed ``step()`` then holds its own device work, not the host part of the next."""
    common = dict(max_num_seqs=args.running, max_num_batched_tokens=max(8192, args.running),
                  max_model_len=args.max_model_len, async_scheduling=False)
    if torch.cuda.is_available():
        common.update(gpu_memory_utilization=0.85)
    else:
        common.update(num_kv_slots=args.running * args.max_model_len)
    cfg = (PagedConfig(enable_prefix_caching=False, **common) if kind == "paged"
           else ContiguousConfig(reservation="oracle", **common))
    return create_engine(model_dir, cfg)


def fill(engine, args: argparse.Namespace) -> None:
    """``--running`` requests, all past their prefill and decoding, long enough to decode through every block of
    every setting (``args.settings``, default 2) and ``args.extra_steps`` more."""
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    total_steps = args.blocks * args.block_steps * getattr(args, "settings", 2) + getattr(args, "extra_steps", 0) + 50
    for i in range(args.running):
        prompt = rng.integers(0, vocab, args.prompt).tolist()
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=total_steps, temperature=0, ignore_eos=True,
                                                                   detokenize=False)))
    while any(not s.is_decoding for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(10):  # settle (graphs, allocator) before timing
        engine.step()


def step_times(engine, args: argparse.Namespace) -> dict[bool, list[float]]:
    """Seconds per step with the log on and off, in alternating blocks."""
    times: dict[bool, list[float]] = {True: [], False: []}
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for block in range(2 * args.blocks):
        record = block % 2 == 0
        engine.ledger.record = record
        for _ in range(args.block_steps):
            sync()
            t0 = time.perf_counter()
            engine.step()  # returns after the host has this step's tokens: a device sync
            times[record].append(time.perf_counter() - t0)
    engine.ledger.record = True
    return times


def recording_us(engine, repeats: int = 20000) -> tuple[float, float]:
    """µs of one step's sample (kv_stats + ledger.sample) and of one allocation change (ledger.hold)."""
    ledger = engine.ledger
    t0 = time.perf_counter()
    for _ in range(repeats):
        ledger.sample(time.perf_counter(), engine.kv_stats())
    per_sample = (time.perf_counter() - t0) / repeats * 1e6
    seq = engine.scheduler.running[0]
    held = ledger.held(seq)
    t0 = time.perf_counter()
    for i in range(repeats):
        ledger.hold(seq, held + (i % 2))
    per_hold = (time.perf_counter() - t0) / repeats * 1e6
    ledger.hold(seq, held)
    ledger.drain()
    return per_sample, per_hold


def change(ratio) -> str:
    """A ratio with its interval, as a change: +1.23% [+0.50%, +2.00%]."""
    return f"{ratio.value - 1:+.2%} [{ratio.low - 1:+.2%}, {ratio.high - 1:+.2%}]"


def save_rows(rows: list[dict], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out, index=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_accounting", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-0.6b" if torch.cuda.is_available() else "tiny-qwen3")
    p.add_argument("--engines", default="contiguous,paged")
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=8, help="blocks of steps per setting (on, off alternate)")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model_dir = ensure_model(args.preset)
    rows, summary = [], []
    for kind in args.engines.split(","):
        engine = build_engine(kind, model_dir, args)
        fill(engine, args)
        engine.ledger.drain()
        steps_before = engine.ledger.step
        times = step_times(engine, args)
        assert engine.ledger.step - steps_before == 2 * args.blocks * args.block_steps, "a step was not sampled"
        log = engine.ledger.drain()
        changes_per_step = len(log.allocations) / max(1, len(log.samples))
        per_sample, per_hold = recording_us(engine)
        on, off = np.array(times[True]) * 1e3, np.array(times[False]) * 1e3
        ratio = ratio_ci(on, off)
        rec_us = per_sample + changes_per_step * per_hold
        summary.append((kind, len(engine.scheduler.running), statistics.median(on), statistics.median(off),
                        ratio, rec_us, rec_us / 1e3 / statistics.median(on)))
        rows += [{"engine": kind, "record": rec, "step": i, "step_ms": 1e3 * t}
                 for rec in (True, False) for i, t in enumerate(times[rec])]
        engine.close()
        del engine
    save_rows(rows, args.out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"KV accounting cost per step ({args.preset}, {device}, prompt {args.prompt}, "
          f"{args.blocks} x {args.block_steps} steps per setting)")
    print(f"{'engine':<11} {'running':>7} {'step ms (log on)':>17} {'step ms (off)':>14} {'on / off - 1 [95% CI]':>27} "
          f"{'recording µs/step':>18} {'share':>7}")
    for kind, running, med_on, med_off, r, rec_us, share in summary:
        print(f"{kind:<11} {running:>7} {med_on:>17.3f} {med_off:>14.3f} {change(r):>27} {rec_us:>18.1f} {share:>7.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
