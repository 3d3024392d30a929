"""A sweep's progress as one line a person can follow: run k of N, its setting, time spent and left.

On a terminal the line is redrawn in place (every second, so the clocks move during a long run),
and anything else written to stderr (a warning, an error) is printed above it, so warnings stay
visible and the line stays last. Elsewhere (CI, a log file) each run's start and finish is one
plain line.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any, Callable, TextIO

CLEAR = "\r\x1b[K"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Console:
    """stderr with a status line kept at the bottom on a terminal; other text goes above it.

    It also drops Hydra's "Error executing job with overrides" line, so an error stays one line.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.status = ""
        self._hidden = False  # the status line is cleared while other text is mid-line
        self._lock = threading.RLock()  # the progress line's ticker writes from a thread of its own

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides"):
            return 0
        with self._lock:
            if not self.status:
                return self.stream.write(text)
            if not self._hidden:
                self.stream.write(CLEAR)
                self._hidden = True
            n = self.stream.write(text)
            if text.endswith("\n"):
                self.stream.write(self.status)
                self._hidden = False
            self.stream.flush()
            return n

    def show(self, line: str) -> None:
        """Draw (or redraw) the status line, cut to the terminal's width so that it never wraps."""
        with self._lock:
            if self._hidden:  # other text is mid-line: leave it, the line comes back after its newline
                self.status = line[: max(20, shutil.get_terminal_size().columns - 1)]
                return
            self.status = line[: max(20, shutil.get_terminal_size().columns - 1)]
            self.stream.write(CLEAR + self.status)
            self.stream.flush()

    def clear(self) -> None:
        with self._lock:
            if self.status and not self._hidden:
                self.stream.write(CLEAR)
            self.status, self._hidden = "", False
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class SweepProgress:
    """Run k of N with its setting; the time left is the mean time of the runs measured so far
    (runs a resumed sweep keeps take no time and are left out of the mean) times the runs to go."""

    def __init__(self, settings: list[str], console: Console | TextIO, clock: Callable[[], float] = time.monotonic,
                 tick_s: float = 1.0) -> None:
        self.settings, self.console, self.clock = settings, console, clock
        self.live = isinstance(console, Console) and console.live
        self.start = clock()
        self.done: dict[str, int] = {}
        self.measured: list[float] = []
        self.current: tuple[int, float] | None = None
        self._stop = threading.Event()
        if self.live:
            threading.Thread(target=self._tick, args=(tick_s,), name="sweep-progress", daemon=True).start()

    def _tick(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            if self.current is not None:
                self._show(f"{self._prefix(self.current[0])} ({self._times()})")

    def _show(self, line: str) -> None:
        if self.live:
            self.console.show(line)  # type: ignore[union-attr]
        else:
            print(line, file=self.console, flush=True)

    @property
    def total(self) -> int:
        return len(self.settings)

    def _prefix(self, num: int) -> str:
        setting = self.settings[num] if 0 <= num < self.total else ""
        return f"run {num + 1} of {self.total}" + (f": {setting}" if setting else "")

    def _times(self) -> str:
        now, finished = self.clock(), sum(self.done.values())
        text = f"{duration(now - self.start)} elapsed"
        if self.measured and finished < self.total:
            left = sum(self.measured) / len(self.measured) * (self.total - finished)
            left -= now - self.current[1] if self.current else 0.0
            text += f", ~{duration(max(left, 0.0))} left"
        return text

    def job_start(self, num: int) -> None:
        self.current = (num, self.clock())
        self._show(f"{self._prefix(num)}" + (" " if self.live else " started ") + f"({self._times()})")

    def job_end(self, num: int, status: str, note: str = "") -> None:
        began = self.current[1] if self.current and self.current[0] == num else self.clock()
        self.current = None
        seconds = self.clock() - began
        self.done[status] = self.done.get(status, 0) + 1
        if status != "reused":
            self.measured.append(seconds)
        took = "(finished earlier)" if status == "reused" else f"in {duration(seconds)}"
        self._show(f"{self._prefix(num)} {status} {took}" + (f", {note}" if note else "") + f" ({self._times()})")

    def close(self) -> None:
        self._stop.set()
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.done.items()))
        if self.live:
            self.console.clear()  # type: ignore[union-attr]
        print(f"sweep: {sum(self.done.values())} of {self.total} runs ({counts or 'none'}) in "
              f"{duration(self.clock() - self.start)}", file=self.console, flush=True)
