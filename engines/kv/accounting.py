"""KV memory accounting, kept incrementally where memory changes, and its log per engine step.

The KV managers tell the ledger each time a sequence's allocation changes (``hold``) and the
engine tells it how many tokens a step computed (``computed``); ``sample`` appends the
step's counters after its admissions. Nothing here walks the cache or the live sequences,
so recording costs every engine the same few operations per step and per allocation,
whatever the number of running sequences or cached blocks (issue 11, point 5).

What the log holds is raw data, turned into the vLLM paper's breakdown by
``harness.bench.kv_breakdown``: one ``KVStats`` per step, and one ``Allocation`` per change of
a sequence's allocation, which is what splits its unfilled slots into reservation and
internal fragmentation once its final length is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from engines.base import KVStats
    from engines.step_clock import StepTimes


class Held(Protocol):
    """What the ledger reads of a sequence (engines.sequence.Sequence)."""

    seq_id: int
    key: tuple[str, int]
    num_computed: int


class Allocation(NamedTuple):
    """Sequence ``key`` owns ``allocated`` slots from sample ``step`` on (0: it released them),
    with ``stored`` of them holding its K/V at that moment."""

    step: int
    request_id: str
    index: int
    allocated: int
    stored: int


@dataclass
class KVLog:
    """What a ledger recorded since it was last drained.

    ``samples``: (step, time, counters) after each step's admissions, steps numbered from the
    engine's start. ``allocations``: every change of a sequence's allocation, stamped with the
    step of the first sample that shows it. ``breakdown``: False for engines that cannot say
    which of their slots hold token states (the transformers baselines). ``baseline``: the
    counters when the log began, which a run's cumulative counters count from. ``times``: where
    each step's time went (engines.step_clock), keyed by the step of its sample; empty for
    engines that do not time their steps.
    """

    samples: list[tuple[int, float, "KVStats"]] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    breakdown: bool = True
    baseline: "KVStats | None" = None
    times: list["StepTimes"] = field(default_factory=list)

    def extend(self, later: "KVLog") -> None:
        """Append a later drain of the same ledger."""
        self.samples.extend(later.samples)
        self.allocations.extend(later.allocations)
        self.times.extend(later.times)
        self.breakdown = self.breakdown and later.breakdown


class KVLedger:
    """Token-slot counters of the sequences holding KV memory, and the per-step log.

    ``owned`` sums each holder's slots (a block shared by two sequences counts twice) and
    ``stored`` their computed tokens, so ``owned - stored`` is the slots allocated but not
    yet (or never) filled; the manager subtracts it from the physical allocation to count
    token states. ``record=False`` keeps the counters but logs nothing (to measure what
    recording costs).
    """

    def __init__(self, record: bool = True) -> None:
        self.record = record
        self.step = 0  # the number of the next sample
        self.owned = 0
        self.stored = 0
        self._held: dict[int, int] = {}  # seq_id -> slots it owns
        self._forgotten: dict[int, int] = {}  # seq_id -> computed tokens whose K/V it no longer holds (a window)
        self.log = KVLog()

    def held(self, seq: Held) -> int:
        return self._held.get(seq.seq_id, 0)

    def hold(self, seq: Held, slots: int) -> None:
        """``seq`` now owns ``slots`` slots (0: it released everything); call after any change of
        ``seq.num_computed`` that comes with it (a prefix hit, a fork), before a release resets it."""
        old = self._held.pop(seq.seq_id, 0)
        if slots:
            self._held[seq.seq_id] = slots
        if not old and slots:
            self.stored += seq.num_computed
        elif old and not slots:
            self.stored -= seq.num_computed - self._forgotten.pop(seq.seq_id, 0)
        self.owned += slots - old
        if self.record and slots != old:
            self.log.allocations.append(Allocation(self.step, *seq.key, slots, seq.num_computed))

    def forget(self, seq: Held, num_tokens: int) -> None:
        """``seq`` (holding memory) no longer holds the K/V of ``num_tokens`` of its computed tokens: they left its
        attention window and their blocks were freed. Call after the ``hold`` that gives the blocks back."""
        self.stored -= num_tokens
        self._forgotten[seq.seq_id] = self._forgotten.get(seq.seq_id, 0) + num_tokens

    def forgotten(self, seq: Held) -> int:
        return self._forgotten.get(seq.seq_id, 0)

    def computed(self, num_tokens: int) -> None:
        """A step computed the K/V of ``num_tokens`` tokens of sequences holding memory."""
        self.stored += num_tokens

    def sample(self, time: float, stats: KVStats) -> None:
        if self.record:
            self.log.samples.append((self.step, time, stats))
        self.step += 1

    def timed(self, times: list[StepTimes]) -> None:
        """Steps' anatomies, each keyed by its sample's step (a step's may come a step late: engines.step_clock)."""
        if self.record:
            self.log.times.extend(times)

    def drain(self) -> KVLog:
        log, self.log = self.log, KVLog()
        return log

    def check(self, expected_owned: dict[int, int], expected_stored: int) -> None:
        """The counters against a walk over the live sequences (tests call this)."""
        assert self._held == {k: v for k, v in expected_owned.items() if v}, "held slots out of step with the tables"
        assert self.owned == sum(expected_owned.values()), f"owned {self.owned} != {sum(expected_owned.values())}"
        assert self.stored == expected_stored, f"stored {self.stored} != {expected_stored}"
