"""The sweep's progress line: run k of N, the setting, elapsed and left; warnings stay visible above it."""

from __future__ import annotations

import io
import time

from harness.bench.progress import CLEAR, Console, SweepProgress, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        """The lines a terminal shows: a carriage return and erase-line (CLEAR) start the line over."""
        lines = [line.rsplit(CLEAR, 1)[-1] for line in self.getvalue().split("\n")]
        return lines if lines[-1] else lines[:-1]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_each_start_and_finish_is_one_line_with_the_time_left():
    out, clock = io.StringIO(), Clock()
    progress = SweepProgress(["engine=hf repeat=0", "engine=paged repeat=0", "engine=hf repeat=1"], out, clock=clock)
    progress.job_start(0)
    clock.now += 30
    progress.job_end(0, "ok", "1,000 output tok/s")
    progress.job_start(1)
    clock.now += 90
    progress.job_end(1, "failed")
    progress.close()
    assert out.getvalue().splitlines() == [
        "run 1 of 3: engine=hf repeat=0 started (0s elapsed)",
        "run 1 of 3: engine=hf repeat=0 ok in 30s, 1,000 output tok/s (30s elapsed, ~1m00s left)",
        "run 2 of 3: engine=paged repeat=0 started (30s elapsed, ~1m00s left)",
        "run 2 of 3: engine=paged repeat=0 failed in 1m30s (2m00s elapsed, ~1m00s left)",  # the mean of 30 s and 90 s
        "sweep: 2 of 3 runs (1 failed, 1 ok) in 2m00s",
    ]


def test_runs_kept_by_a_resumed_sweep_take_no_time_in_the_estimate():
    out, clock = io.StringIO(), Clock()
    progress = SweepProgress(["a=1", "a=2", "a=3", "a=4"], out, clock=clock)
    progress.job_start(0)
    progress.job_end(0, "reused")
    progress.job_start(1)
    clock.now += 10
    progress.job_end(1, "ok")
    assert out.getvalue().splitlines()[1] == "run 1 of 4: a=1 reused (finished earlier) (0s elapsed)"
    assert out.getvalue().splitlines()[-1].endswith("(10s elapsed, ~20s left)")


def test_on_a_terminal_the_progress_line_stays_below_warnings_and_its_clocks_move():
    term, clock = Terminal(), Clock()
    console = Console(term)
    progress = SweepProgress(["engine=paged"], console, clock=clock, tick_s=0.01)
    progress.job_start(0)
    print("WARNING something to see", file=console)
    console.write("half a line")  # text in pieces, as print() and logging write it
    console.write(" and the rest\n")
    clock.now += 75
    deadline = time.time() + 5
    while "1m15s elapsed" not in term.getvalue() and time.time() < deadline:
        time.sleep(0.01)
    assert term.screen() == ["WARNING something to see", "half a line and the rest", "run 1 of 1: engine=paged (1m15s elapsed)"]
    progress.job_end(0, "ok")
    progress.close()
    assert term.screen()[-1] == "sweep: 1 of 1 runs (1 ok) in 1m15s"


def test_console_drops_hydras_error_banner_so_an_error_stays_one_line():
    out = io.StringIO()
    console = Console(out)
    console.write("Error executing job with overrides: ['engine=nope']\n")
    console.write("error: unknown engine\n")
    assert out.getvalue() == "error: unknown engine\n"


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
