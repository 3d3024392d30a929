"""A first-fit (or best-fit) allocator of contiguous regions over one arena of token slots.

Free space is a list of extents sorted by start; freeing coalesces neighbours. Nothing is
ever moved (no compaction), so holes stay where requests left them: external
fragmentation happens here as it does in a real contiguous cache.

The allocator also keeps its free slots and an index of its hole sizes up to date as it
goes, so that how much of the free space a demand of R slots cannot use, and the largest
hole, are known in O(log C) without walking the holes (what measuring costs must not grow
with the state measured).
"""

from __future__ import annotations

import bisect

POLICIES = ("first_fit", "best_fit")


class HoleSizes:
    """A multiset of hole sizes in 1..capacity: the count and total of those below a size, and the largest.

    Two Fenwick trees over the sizes (counts and slot totals), so that each change and each
    query costs O(log capacity).
    """

    def __init__(self, capacity: int) -> None:
        self.size = capacity
        self.count = [0] * (capacity + 1)
        self.total = [0] * (capacity + 1)
        self.num_holes = 0
        self.top = 1 << max(capacity, 1).bit_length()  # the highest power of two for the descent

    def add(self, size: int, times: int = 1) -> None:
        """Add (``times`` = 1) or remove (-1) one hole of ``size`` slots."""
        self.num_holes += times
        i = size
        while i <= self.size:
            self.count[i] += times
            self.total[i] += times * size
            i += i & -i

    def slots_below(self, size: int) -> int:
        """Free slots in holes smaller than ``size``."""
        i, s = min(size - 1, self.size), 0
        while i > 0:
            s += self.total[i]
            i -= i & -i
        return s

    def largest(self) -> int:
        """The size of the largest hole (0 when there is none): the first size whose count prefix reaches all holes."""
        if self.num_holes == 0:
            return 0
        pos, below, step = 0, 0, self.top
        while step:
            nxt = pos + step
            if nxt <= self.size and below + self.count[nxt] < self.num_holes:
                pos, below = nxt, below + self.count[nxt]
            step >>= 1
        return pos + 1


class Arena:
    def __init__(self, capacity: int, policy: str = "first_fit") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown allocator {policy!r}; choose one of {', '.join(POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        self.starts: list[int] = []  # free extents, sorted by start
        self.lengths: list[int] = []
        self.holes = HoleSizes(capacity)
        self.num_free = 0
        if capacity:
            self._insert(0, 0, capacity)

    @property
    def largest_free_extent(self) -> int:
        return self.holes.largest()

    def unusable_by(self, size: int) -> int:
        """Free slots that a region of ``size`` slots cannot use: those in holes smaller than it."""
        return self.holes.slots_below(size)

    # -- the extent list, with the counters kept in step --------------------------------------
    def _insert(self, i: int, start: int, size: int) -> None:
        self.starts.insert(i, start)
        self.lengths.insert(i, size)
        self.holes.add(size)
        self.num_free += size

    def _delete(self, i: int) -> int:
        size = self.lengths.pop(i)
        del self.starts[i]
        self.holes.add(size, -1)
        self.num_free -= size
        return size

    def _resize(self, i: int, start: int, size: int) -> None:
        self.holes.add(self.lengths[i], -1)
        self.num_free += size - self.lengths[i]
        self.starts[i], self.lengths[i] = start, size
        self.holes.add(size)

    # -- allocation ---------------------------------------------------------------------------
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
            self._delete(i)
        else:
            self._resize(i, self.starts[i] + size, self.lengths[i] - size)

    def free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        if i > 0 and self.starts[i - 1] + self.lengths[i - 1] > start:
            raise ValueError(f"freeing [{start}, {start + size}) overlaps a free extent")
        if i < len(self.starts) and start + size > self.starts[i]:
            raise ValueError(f"freeing [{start}, {start + size}) overlaps a free extent")
        merge_left = i > 0 and self.starts[i - 1] + self.lengths[i - 1] == start
        merge_right = i < len(self.starts) and start + size == self.starts[i]
        if merge_left and merge_right:
            right = self._delete(i)
            self._resize(i - 1, self.starts[i - 1], self.lengths[i - 1] + size + right)
        elif merge_left:
            self._resize(i - 1, self.starts[i - 1], self.lengths[i - 1] + size)
        elif merge_right:
            self._resize(i, start, self.lengths[i] + size)
        else:
            self._insert(i, start, size)

    def extend(self, start: int, size: int, extra: int) -> bool:
        """Grow the region [start, start + size) in place by ``extra`` slots if the space after it is free."""
        end = start + size
        i = bisect.bisect_left(self.starts, end)
        if i == len(self.starts) or self.starts[i] != end or self.lengths[i] < extra:
            return False
        self._take_front(i, extra)
        return True

    def check(self) -> None:
        """The counters against a walk over the extents (tests call this)."""
        assert self.num_free == sum(self.lengths), "free-slot counter out of step"
        assert self.largest_free_extent == max(self.lengths, default=0), "largest hole out of step"
        assert self.holes.num_holes == len(self.lengths)
        for size in {1, 2, *self.lengths, self.capacity}:
            assert self.unusable_by(size) == sum(n for n in self.lengths if n < size), f"holes below {size} out of step"
