"""Where an engine step's time goes: host wall time by phase, and device time by CUDA events.

The step anatomy of issue 13 (definitions in docs/methodology.md, "Step anatomy"). The
engine laps the clock at each phase boundary of ``schedule -> run -> postprocess``; every
call into the KV manager is timed apart (``wrap``), whichever phase it happens in, so the
host cost of the KV strategy is one number (``kv``). The device's work (forward and sampler)
is bracketed by two CUDA events, read only after the step's one host sync, so measuring adds
no sync. Two, not one per kernel group: an event between two kernels costs the device a
drain (measured at tens of µs a step with a third event between forward and sampler), while
one before the forward finds the device idle and one after the sampler precedes the copy
that waits for it anyway. On a CPU the forward runs synchronously, and the span is a wall
clock. What it costs a step, on and off (``engine.step_anatomy``), is measured in
``benchmarks/step_anatomy.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

HOST_PHASES = ("schedule", "kv", "map", "prepare", "launch", "sync", "postprocess")


@dataclass
class StepTimes:
    """One step, in seconds. Host phases sum to ``wall``; ``gpu``: the device's time from the first kernel of the
    forward to the last of the sampler (NaN: not measured)."""

    step: int  # the ledger's number of the step's KV sample
    wall: float
    schedule: float
    kv: float
    prepare: float
    launch: float
    sync: float
    postprocess: float
    gpu: float = math.nan
    map: float = 0.0  # mapping and unmapping KV pages (virtual-contiguous storage; 0 for the others)


# The KV manager's calls an engine makes during a step (engines.kv.manager.KVManager).
KV_CALLS = ("admit", "allocate", "free", "fork", "commit", "commit_many", "swap_in", "swap_out", "slot_mapping",
            "decode_slots", "addressing", "kv_stats", "take_ops", "map_ahead")


class _TimedKV:
    """The KV manager with its step-time calls timed into the clock's ``kv`` phase; other attributes pass through."""

    def __init__(self, kv: Any, clock: "StepClock") -> None:
        object.__setattr__(self, "_kv", kv)
        for name in KV_CALLS:
            if hasattr(kv, name):
                object.__setattr__(self, name, clock.timed(getattr(kv, name)))

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # the wrapped manager's class, for isinstance and messages
        return type(self._kv)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._kv, name, value)


class StepClock:
    """Laps of one step at a time. Off, every method returns at once and ``finish`` gives nothing."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.on = enabled
        self.cuda = device.type == "cuda"
        self._free_events: list[torch.cuda.Event] = []
        self._span: Any = None  # this step's device span: (start event, end event) on CUDA, else start and seconds
        self._pending: list[tuple[StepTimes, Any]] = []  # steps whose device work may not have completed
        self._stream: Any = None  # the stream the engine's steps run on, where their events are recorded
        self._cpu_gpu = 0.0
        self._phases = dict.fromkeys(HOST_PHASES, 0.0)
        self._kv_in_lap = 0.0
        self._t0 = self._last = 0.0

    def wrap(self, kv: Any) -> Any:
        """The KV manager to hand the scheduler and runner: timed when the clock is on, itself when off."""
        return _TimedKV(kv, self) if self.on else kv

    def timed(self, fn: Callable) -> Callable:
        clock, now = self, time.perf_counter

        def call(*args: Any) -> Any:  # lean: a step calls the KV manager about once per running sequence
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
        self._span = None
        self._cpu_gpu = 0.0
        if self.cuda and self._stream is None:  # the engine's thread and stream (a lookup costs µs: once)
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

    # -- the device span: begin before the forward, end after the sampler ---------------------------------
    def _mark(self) -> torch.cuda.Event:
        event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def begin(self) -> None:
        """The step's device work starts here (before its first forward)."""
        if not self.on:
            return
        self._span = [self._mark(), None] if self.cuda else time.perf_counter()

    def end(self) -> None:
        """The step's device work ends here (after its last sampler, or its forward if it samples nothing)."""
        if not self.on:
            return
        if self.cuda:
            self._span[1] = self._mark()
        else:
            self._cpu_gpu = time.perf_counter() - self._span

    def finish(self, step: int) -> list[StepTimes]:
        """Close the step and return the times of every step whose device work has completed: this one after
        its host sync, and any earlier one read now (a prompt chunk that samples nothing, or the step before
        under asynchronous scheduling)."""
        if not self.on:
            return []
        self.lap("postprocess")
        times = StepTimes(step, self._last - self._t0, **self._phases)
        if not self.cuda:
            times.gpu = self._cpu_gpu
            return [times]
        self._pending.append((times, self._span))
        return self.collect()

    def collect(self) -> list[StepTimes]:
        """The times of earlier steps whose device work has completed since (read in step order)."""
        done = []
        while self._pending and (self._pending[0][1] is None or self._pending[0][1][1].query()):
            t, span = self._pending.pop(0)
            if span is not None:
                t.gpu = span[0].elapsed_time(span[1]) / 1e3
                self._free_events += span
            done.append(t)
        return done
