"""A first-fit (or best-fit) allocator of contiguous regions over one arena of token slots.

Free space is a list of extents sorted by start; freeing coalesces neighbours. Nothing is
ever moved (no compaction), so holes stay where requests left them: external
fragmentation happens here as it does in a real contiguous cache.
"""

from __future__ import annotations

import bisect

POLICIES = ("first_fit", "best_fit")


class Arena:
    def __init__(self, capacity: int, policy: str = "first_fit") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown allocator {policy!r}; choose one of {', '.join(POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        self.starts: list[int] = [0] if capacity else []  # free extents, sorted by start
        self.lengths: list[int] = [capacity] if capacity else []

    @property
    def num_free(self) -> int:
        return sum(self.lengths)

    @property
    def largest_free_extent(self) -> int:
        return max(self.lengths, default=0)

    def allocate(self, size: int) -> int | None:
        """Start of a new region of ``size`` slots, or None if no hole is large enough."""
        fits = [i for i, n in enumerate(self.lengths) if n >= size]
        if not fits:
            return None
        i = fits[0] if self.policy == "first_fit" else min(fits, key=lambda j: (self.lengths[j], self.starts[j]))
        start = self.starts[i]
        self._take_front(i, size)
        return start

    def _take_front(self, i: int, size: int) -> None:
        """Remove the first ``size`` slots of free extent ``i``."""
        if self.lengths[i] == size:
            del self.starts[i], self.lengths[i]
        else:
            self.starts[i] += size
            self.lengths[i] -= size

    def free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        if i > 0 and self.starts[i - 1] + self.lengths[i - 1] > start:
            raise ValueError(f"freeing [{start}, {start + size}) overlaps a free extent")
        if i < len(self.starts) and start + size > self.starts[i]:
            raise ValueError(f"freeing [{start}, {start + size}) overlaps a free extent")
        self.starts.insert(i, start)
        self.lengths.insert(i, size)
        if i + 1 < len(self.starts) and start + size == self.starts[i + 1]:  # merge right
            self.lengths[i] += self.lengths.pop(i + 1)
            self.starts.pop(i + 1)
        if i > 0 and self.starts[i - 1] + self.lengths[i - 1] == start:  # merge left
            self.lengths[i - 1] += self.lengths.pop(i)
            self.starts.pop(i)

    def extend(self, start: int, size: int, extra: int) -> bool:
        """Grow the region [start, start + size) in place by ``extra`` slots if the space after it is free."""
        end = start + size
        i = bisect.bisect_left(self.starts, end)
        if i == len(self.starts) or self.starts[i] != end or self.lengths[i] < extra:
            return False
        self._take_front(i, extra)
        return True
