"""The engine's KV log as the server keeps it for clients: ``GET /kvbench/kv_log``.

The engine logs its KV counters after every step's admissions and every change of a
sequence's allocation (engines.kv.accounting); the engine loop drains that log each step
into this feed. A client (``harness bench-serve``) reads what came after its cursors, so an
HTTP run gets the same per-step data, and the same KV breakdown, as an offline run,
instead of polling snapshots at its own pace. The feed keeps the newest ``max_items`` of
each kind; a reader that falls further behind is told how many it missed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from collections import deque
from typing import Any

from engines.base import KVStats
from engines.kv.accounting import Allocation, KVLog
from engines.step_clock import StepTimes

STATS_FIELDS = tuple(f.name for f in dataclasses.fields(KVStats))
TIME_FIELDS = tuple(f.name for f in dataclasses.fields(StepTimes))
REQUIRED_TIME_FIELDS = set(TIME_FIELDS) - {"map"}  # a server from before the map phase sends none: 0


class KVFeed:
    def __init__(self, max_items: int = 1_000_000) -> None:
        self._samples: deque[tuple[int, float, KVStats]] = deque(maxlen=max_items)
        self._allocations: deque[Allocation] = deque(maxlen=max_items)
        self._times: deque[StepTimes] = deque(maxlen=max_items)
        self._num_samples = 0  # ever added: the cursor after the newest
        self._num_allocations = 0
        self._num_times = 0
        self.breakdown = True
        self._lock = threading.Lock()

    def add(self, log: KVLog | None) -> None:
        if log is None:
            return
        with self._lock:
            self._samples.extend(log.samples)
            self._allocations.extend(log.allocations)
            self._times.extend(log.times)
            self._num_samples += len(log.samples)
            self._num_allocations += len(log.allocations)
            self._num_times += len(log.times)
            self.breakdown = log.breakdown

    def since(self, samples: int, allocations: int, times: int = 0) -> dict[str, Any]:
        """What came after the cursors, as JSON: samples as [step, time, *STATS_FIELDS] rows,
        allocations as [step, request_id, index, allocated, stored] rows, step anatomies as
        TIME_FIELDS rows, the next cursors, and the server's clock now (``time.perf_counter``,
        the clock of the samples' times)."""
        with self._lock:
            s, s_missed = _after(self._samples, self._num_samples, samples)
            a, a_missed = _after(self._allocations, self._num_allocations, allocations)
            t, t_missed = _after(self._times, self._num_times, times)
            reply = {
                "fields": ["step", "time", *STATS_FIELDS],
                "samples": [[step, t, *dataclasses.astuple(stats)] for step, t, stats in s],
                "allocations": [list(x) for x in a],
                "time_fields": list(TIME_FIELDS),
                "times": [[_json_number(v) for v in dataclasses.astuple(x)] for x in t],
                "next": {"samples": self._num_samples, "allocations": self._num_allocations, "times": self._num_times},
                "missed": {"samples": s_missed, "allocations": a_missed, "times": t_missed},
                "breakdown": self.breakdown,
            }
        reply["now"] = time.perf_counter()
        return reply


def _after(items: deque, total: int, cursor: int) -> tuple[list, int]:
    """The items numbered ``cursor`` and later (the deque holds the last ``len(items)`` of ``total``), and how many of
    those it no longer holds."""
    first = total - len(items)
    cursor = min(max(cursor, 0), total)
    missed = max(0, first - cursor)
    return list(itertools.islice(items, max(cursor, first) - first, None)), missed


def log_from_reply(reply: dict[str, Any], rename: dict[str, str], clock_offset: float) -> KVLog:
    """A ``since`` reply as a KVLog on the reader's clock (server time - ``clock_offset``), request ids renamed."""
    names = reply["fields"][2:]
    samples = [(int(row[0]), float(row[1]) - clock_offset, KVStats(**dict(zip(names, row[2:]))))
               for row in reply["samples"]]
    allocations = [Allocation(int(step), rename.get(rid, rid), int(index), int(allocated), int(stored))
                   for step, rid, index, allocated, stored in reply["allocations"]]
    fields = reply.get("time_fields", ())
    times = [StepTimes(**{k: (int(v) if k == "step" else math.nan if v is None else float(v))
                          for k, v in zip(fields, row) if k in TIME_FIELDS})
             for row in reply.get("times", ()) if REQUIRED_TIME_FIELDS <= set(fields)]  # another version: none
    return KVLog(samples, allocations, breakdown=bool(reply["breakdown"]), times=times)


def _json_number(value: float) -> float | None:
    """NaN as null: JSON has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value
