"""Orca-style contiguous KV memory: each sequence owns one region of an arena, sized up front.

Reservation policies (the vLLM paper's Orca variants):
``max``: max_model_len slots; ``pow2``: prompt + output length rounded up to a power of
two; ``oracle``: exactly prompt + output length. The output length is the request's
``max_tokens`` (the true length when it ignores EOS, as the benchmark workloads do; an
upper bound otherwise). A request with n samples reserves all n regions at admission;
the samples copy the prompt's K/V (an arena cannot share it).
"""

from __future__ import annotations

import numpy as np

from engines.base import KVStats
from engines.kv.arena import Arena
from engines.kv.manager import KVManager
from engines.sequence import Sequence

RESERVATIONS = ("max", "pow2", "oracle")


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class ContiguousKVManager(KVManager):
    def __init__(self, capacity: int, *, reservation: str, allocator: str, max_model_len: int) -> None:
        if reservation not in RESERVATIONS:
            raise ValueError(f"unknown reservation policy {reservation!r}; choose one of {', '.join(RESERVATIONS)}")
        self.block_size = 1
        super().__init__()
        self.capacity = capacity
        self.reservation = reservation
        self.max_model_len = max_model_len
        self.arena = Arena(capacity, allocator)
        self.regions: dict[int, tuple[int, int]] = {}  # seq_id -> (start, size)
        self.spare: dict[int, list[tuple[int, int]]] = {}  # seq_id -> regions reserved for its samples

    def reservation_for(self, seq: Sequence) -> int:
        bound = seq.final_len_bound
        if self.reservation == "max":
            return self.max_model_len
        if self.reservation == "pow2":
            return min(next_pow2(bound), self.max_model_len)
        return bound

    def can_ever_fit(self, seq: Sequence) -> bool:
        return self.reservation_for(seq) * (1 + seq.num_forks) <= self.capacity

    def admit(self, seq: Sequence) -> None:
        seq.num_computed = 0  # no prefix cache: an arena region is private

    def _reserve(self, seq: Sequence) -> bool:
        size = self.reservation_for(seq)
        regions = []
        for _ in range(1 + seq.num_forks):
            start = self.arena.allocate(size)
            if start is None:
                for s, n in regions:
                    self.arena.free(s, n)
                return False
            regions.append((start, size))
        self.regions[seq.seq_id] = regions[0]
        self.spare[seq.seq_id] = regions[1:]
        self.ledger.hold(seq, size * len(regions))
        return True

    def allocate(self, seq: Sequence, num_new: int) -> bool:
        if seq.seq_id not in self.regions and not self._reserve(seq):
            return False
        start, size = self.regions[seq.seq_id]
        needed = seq.num_computed + num_new
        if needed <= size:
            return True
        # The reservation was too small (an upper bound that was not one): grow in place or fail.
        if self.arena.extend(start, size, needed - size):
            self.regions[seq.seq_id] = (start, needed)
            self.ledger.hold(seq, self.ledger.held(seq) + needed - size)
            return True
        return False

    def free(self, seq: Sequence) -> None:
        self.ledger.hold(seq, 0)
        region = self.regions.pop(seq.seq_id, None)
        if region is not None:
            self.arena.free(*region)
        for region in self.spare.pop(seq.seq_id, []):
            self.arena.free(*region)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        start, size = self.spare[parent.seq_id].pop()
        self.regions[child.seq_id] = (start, size)
        self.ledger.hold(parent, self.ledger.held(parent) - size)
        self.ledger.hold(child, size)
        p_start = self.regions[parent.seq_id][0]
        n = parent.num_computed
        self.ops.copies += list(zip(range(p_start, p_start + n), range(start, start + n)))

    def commit(self, seq: Sequence) -> None:
        """Nothing to publish: an arena has no prefix cache."""

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        base = self.regions[seq.seq_id][0]
        return np.arange(base + start, base + end, dtype=np.int64)

    def decode_slots(self, seqs: list[Sequence], positions: np.ndarray) -> np.ndarray:
        return np.fromiter((self.regions[s.seq_id][0] for s in seqs), dtype=np.int64, count=len(seqs)) + positions

    def addressing(self, seqs: list[Sequence]) -> tuple[None, np.ndarray]:
        return None, np.fromiter((self.regions[s.seq_id][0] for s in seqs), dtype=np.int32, count=len(seqs))

    def max_blocks_per_seq(self, max_model_len: int) -> int:
        return 0

    def kv_stats(self, head: Sequence | None) -> KVStats:
        """Counters only; ``external`` is the free space in holes too small for ``head``'s region."""
        free = self.arena.num_free
        return KVStats(
            capacity=self.capacity, stored=self.ledger.stored, allocated=self.capacity - free, free=free,
            largest_free_extent=self.arena.largest_free_extent,
            external=self.arena.unusable_by(self.reservation_for(head)) if head is not None else 0,
        )

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """No two regions overlap, and regions + free extents tile the arena (tests call this)."""
        spans = sorted(list(self.regions.values()) + [r for rs in self.spare.values() for r in rs]
                       + list(zip(self.arena.starts, self.arena.lengths)))
        pos = 0
        for start, size in spans:
            assert start == pos, f"gap or overlap at slot {pos} (next span starts at {start})"
            pos += size
        assert pos == self.capacity
        assert set(self.regions) <= {s.seq_id for s in seqs}, "a region outlived its sequence"
        self.arena.check()
        owned = {i: size + sum(n for _, n in self.spare.get(i, [])) for i, (_, size) in self.regions.items()}
        self.ledger.check(owned, sum(s.num_computed for s in seqs if s.seq_id in self.regions))
