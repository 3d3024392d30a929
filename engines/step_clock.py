"""Where an engine step's time goes: host wall time by phase, and device time by CUDA events.

The step anatomy of issue 13 (definitions in docs/methodology.md, "Step anatomy"). The
engine laps the clock at each phase boundary of ``schedule -> run -> postprocess``; every
call into the KV manager is timed apart (``wrap``), whichever phase it happens in, so the
host cost of the KV strategy is one number (``kv``). Device spans are bracketed with CUDA
events, read only after the step's one host sync, so measuring adds no sync. On a CPU the
forward runs synchronously, and its spans are wall clocks. What it costs a step, on and off
(``engine.step_anatomy``), is measured in ``benchmarks/step_anatomy.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

HOST_PHASES = ("schedule", "kv", "prepare", "launch", "sync", "postprocess")
DEVICE_SPANS = ("forward", "sample")


@dataclass
class StepTimes:
    """One step, in seconds. Host phases sum to ``wall``; device spans are GPU time (NaN: not measured)."""

    step: int  # the ledger's number of the step's KV sample
    wall: float
    schedule: float
    kv: float
    prepare: float
    launch: float
    sync: float
    postprocess: float
    forward: float = math.nan
    sample: float = math.nan


# The KV manager's calls an engine makes during a step (engines.kv.manager.KVManager).
KV_CALLS = ("admit", "allocate", "free", "fork", "commit", "swap_in", "swap_out", "slot_mapping", "decode_slots",
            "addressing", "kv_stats", "take_ops")


class _TimedKV:
    """The KV manager with its step-time calls timed into the clock's ``kv`` phase; other attributes pass through."""

    def __init__(self, kv: Any, clock: "StepClock") -> None:
        object.__setattr__(self, "_kv", kv)
        for name in KV_CALLS:
            if hasattr(kv, name):
                object.__setattr__(self, name, clock.timed(getattr(kv, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._kv, name, value)


class StepClock:
    """Laps of one step at a time. Off, every method returns at once and ``finish`` gives None."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.on = enabled
        self.cuda = device.type == "cuda"
        self._free_events: list[torch.cuda.Event] = []
        self._spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # this step's (span, start, end)
        self._pending: list[tuple[StepTimes, list]] = []  # steps whose device work may not have completed
        self._span_start: Any = None
        self._stream: Any = None  # the stream the engine's steps run on, where their events are recorded
        self._cpu_spans = dict.fromkeys(DEVICE_SPANS, 0.0)
        self._phases = dict.fromkeys(HOST_PHASES, 0.0)
        self._kv_in_lap = 0.0
        self._t0 = self._last = 0.0

    def wrap(self, kv: Any) -> Any:
        """The KV manager to hand the scheduler and runner: timed when the clock is on, itself when off."""
        return _TimedKV(kv, self) if self.on else kv

    def timed(self, fn: Callable) -> Callable:
        clock, now = self, time.perf_counter

        def call(*args: Any) -> Any:  # lean: a step calls the KV manager about twice per running sequence
            t = now()
            out = fn(*args)
            clock._kv_in_lap += now() - t
            return out
        return call

    def start(self) -> None:
        if not self.on:
            return
        for p in HOST_PHASES:
            self._phases[p] = 0.0
        for s in DEVICE_SPANS:
            self._cpu_spans[s] = 0.0
        self._spans = []
        if self.cuda and self._stream is None:  # the engine's thread and stream (a lookup costs ~10 µs: once)
            self._stream = torch.cuda.current_stream()
        self._kv_in_lap = 0.0
        self._t0 = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the last lap was ``phase`` (less the KV calls within it, which go to ``kv``)."""
        if not self.on:
            return
        now = time.perf_counter()
        self._phases[phase] += now - self._last - self._kv_in_lap
        self._phases["kv"] += self._kv_in_lap
        self._kv_in_lap = 0.0
        self._last = now

    # -- device spans: begin, then end each span in turn (forward, sample, forward, ...) ------------------
    def _mark(self) -> torch.cuda.Event:
        event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def begin(self) -> None:
        """Device work of the spans that follow starts here."""
        if not self.on:
            return
        if self.cuda:
            self._span_start = self._mark()
        else:
            self._span_start = time.perf_counter()

    def end(self, span: str) -> None:
        """The device work queued since the last begin/end was ``span``; the next span starts here."""
        if not self.on:
            return
        if self.cuda:
            event = self._mark()
            self._spans.append((span, self._span_start, event))
            self._span_start = event
        else:
            now = time.perf_counter()
            self._cpu_spans[span] += now - self._span_start
            self._span_start = now

    def finish(self, step: int) -> list[StepTimes]:
        """Close the step and return the times of every step whose device work has completed: this one after
        its host sync, and any earlier one that had none (a prompt chunk that samples nothing), read now."""
        if not self.on:
            return []
        self.lap("postprocess")
        times = StepTimes(step, self._last - self._t0, **self._phases)
        if not self.cuda:
            times.forward, times.sample = (self._cpu_spans[s] for s in DEVICE_SPANS)
            return [times]
        self._pending.append((times, self._spans))
        done = []
        while self._pending and (not self._pending[0][1] or self._pending[0][1][-1][2].query()):  # stream order
            t, spans = self._pending.pop(0)
            if spans:
                t.forward = t.sample = 0.0
            used = {}
            for span, a, b in spans:
                setattr(t, span, getattr(t, span) + a.elapsed_time(b) / 1e3)
                used[id(a)], used[id(b)] = a, b
            self._free_events.extend(used.values())
            done.append(t)
        return done
