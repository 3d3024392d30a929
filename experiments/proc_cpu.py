"""CPU seconds used so far by a process and its descendants, per thread name: ``python3 experiments/proc_cpu.py PID``.

The serving runs read it before and after a benchmark to see where the host time went
(the uvicorn event loop, the engine loop, the engine process), from /proc on Linux.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = task / "children"
            if children.exists():
                todo += [int(c) for c in children.read_text().split()]
    return out


def cpu_by_thread(pid: int) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for p in descendants(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            seconds[f"{p}:{name}"] += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return dict(seconds)


if __name__ == "__main__":
    print(json.dumps(cpu_by_thread(int(sys.argv[1]))))
