"""Virtual-contiguous KV memory (vAttention, Prabhu et al., ASPLOS 2025): contiguous addresses, paged memory.

Each running sequence owns a *request slot*: a virtual range of ``slot_tokens`` token slots
(``max_model_len`` rounded up to whole pages) in every layer's K and V plane, so its K/V is
contiguous and the contiguous kernels address it with one start offset. Physical memory
backs a slot one *page group* at a time: one page of ``tokens_per_page`` tokens in each of
the ``2 x num_layers`` planes, mapped as the sequence grows. This manager decides which
group backs which page of which slot and emits the maps and unmaps (``CacheOps``); the
storage (``engines.kv.vmm``) carries them out, on the driver or, on a CPU, as accounting.

Each plane begins with an *anchor* page, backed for the cache's whole life and no slot's: every
kernel argument (a plane's start) points at mapped memory, as Triton's launcher checks, and
padding rows of a CUDA graph read it. Slots start after it.

Freed pages stay mapped (``deferred_reclamation``, the paper's section 6.1): a later
sequence given the same slot reuses them without a driver call. They are free memory
all the same: a group is taken back from an idle page (an unmap and a map) only when no
unmapped group is left. With ``premap`` the whole pool starts out mapped, idle, spread
over the slots page by page, so that a run's driver calls are only such takings back.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engines.base import KVStats
from engines.kv.manager import KVManager
from engines.sequence import Sequence


class VirtualKVManager(KVManager):
    def __init__(
        self,
        num_groups: int,
        tokens_per_page: int,
        *,
        num_request_slots: int,
        max_model_len: int,
        deferred_reclamation: bool = True,
        premap: bool = False,
    ) -> None:
        self.block_size = 1  # the kernels see contiguous addressing
        super().__init__()
        self.tokens_per_page = tokens_per_page
        self.pages_per_slot = -(-max_model_len // tokens_per_page)
        self.slot_tokens = self.pages_per_slot * tokens_per_page
        self.anchor_tokens = tokens_per_page  # the anchor page at the start of every plane
        self.num_groups = num_groups
        self.capacity = num_groups * tokens_per_page
        self.max_model_len = max_model_len
        self.deferred_reclamation = deferred_reclamation
        self.num_request_slots = num_request_slots
        # page_of[r, j]: the group mapped at page j of slot r (-1: none). A slot's mapped pages need not be a
        # prefix: a sequence holds pages 0..held-1, and idle pages may be mapped anywhere.
        self.page_of = np.full((num_request_slots, self.pages_per_slot), -1, dtype=np.int64)
        self.unmapped: list[int] = list(range(num_groups - 1, -1, -1))  # a stack: low groups first
        self.idle: dict[tuple[int, int], int] = {}  # (slot, page) -> group: mapped, free
        self.idle_count = np.zeros(num_request_slots, dtype=np.int64)  # idle pages per slot
        self.free_slots: deque[int] = deque(range(num_request_slots))
        self.slot_of: dict[int, int] = {}  # seq_id -> its request slot
        self.held: dict[int, int] = {}  # seq_id -> pages it holds (a prefix of its slot)
        self.spare: dict[int, list[tuple[int, int]]] = {}  # seq_id -> (slot, pages held) reserved for its samples
        self.num_maps = 0  # cumulative page-group maps and unmaps
        self.num_unmaps = 0
        if premap and deferred_reclamation:
            self._premap()

    def _premap(self) -> None:
        """Map the whole pool, idle, before the first step: page 0 of every slot, then page 1, and so on. An
        admission then finds its first pages mapped, as in a warm deferred-reclamation cache, and the driver's
        cost is paid at start-up, as the other engines pay for their one allocation."""
        for page in range(self.pages_per_slot):
            for slot in range(self.num_request_slots):
                if not self.unmapped:
                    return
                group = self.unmapped.pop()
                self.page_of[slot, page] = group
                self.idle[(slot, page)] = group
                self.idle_count[slot] += 1
                self.ops.maps.append((slot, page, group))
                self.num_maps += 1

    # -- sizes -------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_page)

    @property
    def num_free_groups(self) -> int:
        return len(self.unmapped) + len(self.idle)

    def can_ever_fit(self, seq: Sequence) -> bool:
        bound = seq.final_len_bound
        return bound <= self.slot_tokens and self.pages_for(bound) * (1 + seq.num_forks) <= self.num_groups

    # -- page groups -------------------------------------------------------------------------
    def _back(self, slot: int, page: int) -> None:
        """Put a free group at ``page`` of ``slot``: the idle one already there, else an unmapped one, else one
        taken from another idle page (the caller checked that a group is free)."""
        if self.page_of[slot, page] >= 0:
            del self.idle[(slot, page)]
            self.idle_count[slot] -= 1
            return
        if self.unmapped:
            group = self.unmapped.pop()
        else:
            (s, p), group = self.idle.popitem()  # the most recently freed
            self.idle_count[s] -= 1
            self._unmap(s, p)
        self.page_of[slot, page] = group
        self.ops.maps.append((slot, page, group))
        self.num_maps += 1

    def _unmap(self, slot: int, page: int) -> None:
        self.ops.unmaps.append((slot, page))
        self.page_of[slot, page] = -1
        self.num_unmaps += 1

    def _grow(self, slot: int, have: int, want: int) -> None:
        for page in range(have, want):
            self._back(slot, page)

    def _release(self, slot: int, pages: int) -> None:
        """Pages 0..pages-1 of ``slot`` go free: kept mapped (idle), or unmapped at once."""
        for page in range(pages):
            group = int(self.page_of[slot, page])
            if self.deferred_reclamation:
                self.idle[(slot, page)] = group
                self.idle_count[slot] += 1
            else:
                self._unmap(slot, page)
                self.unmapped.append(group)
        self.free_slots.append(slot)

    def _take_slot(self) -> int:
        """A free request slot (the caller checked there is one): the one with the most idle pages, so the fewest
        maps; the longest free among equals."""
        free = np.fromiter(self.free_slots, dtype=np.int64, count=len(self.free_slots))
        best = int(np.argmax(self.idle_count[free]))
        slot = self.free_slots[best]
        del self.free_slots[best]
        return slot

    # -- the KVManager contract --------------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        seq.num_computed = 0  # no prefix cache: a slot is private

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """A slot for ``seq`` backed up to ``num_tokens``, and one per sample it will fork, backed up to its
        prompt (the samples copy it): all or nothing."""
        pages = self.pages_for(num_tokens)
        fork_pages = self.pages_for(seq.num_prompt)
        if len(self.free_slots) < 1 + seq.num_forks or pages + seq.num_forks * fork_pages > self.num_free_groups:
            return False
        slot = self._take_slot()
        self._grow(slot, 0, pages)
        self.slot_of[seq.seq_id], self.held[seq.seq_id] = slot, pages
        spare = []
        for _ in range(seq.num_forks):
            s = self._take_slot()
            self._grow(s, 0, fork_pages)
            spare.append((s, fork_pages))
        self.spare[seq.seq_id] = spare
        self.ledger.hold(seq, (pages + seq.num_forks * fork_pages) * self.tokens_per_page)
        return True

    def allocate(self, seq: Sequence, num_new: int) -> bool:
        end = seq.num_computed + num_new
        if seq.seq_id not in self.slot_of:
            return self._reserve(seq, end)
        have = self.held[seq.seq_id]
        want = self.pages_for(end)
        if want <= have:
            return True
        if want - have > self.num_free_groups:
            return False
        self._grow(self.slot_of[seq.seq_id], have, want)
        self.held[seq.seq_id] = want
        self.ledger.hold(seq, self.ledger.held(seq) + (want - have) * self.tokens_per_page)
        return True

    def map_ahead(self, seqs: list[Sequence], num_tokens: int) -> None:
        """Back ``num_tokens`` more tokens of each of ``seqs`` now, where a group is free (the next step's
        ``allocate`` then finds its page mapped): the maps run while the device runs the step just launched."""
        for seq in seqs:
            ahead = min(num_tokens, seq.final_len_bound - seq.num_computed)  # never past its last token
            if seq.seq_id in self.slot_of and ahead > 0 and self.num_free_groups:
                self.allocate(seq, ahead)

    def free(self, seq: Sequence) -> None:
        self.ledger.hold(seq, 0)
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self._release(slot, self.held.pop(seq.seq_id))
        for s, pages in self.spare.pop(seq.seq_id, []):
            self._release(s, pages)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        slot, pages = self.spare[parent.seq_id].pop()
        self.slot_of[child.seq_id], self.held[child.seq_id] = slot, pages
        tokens = pages * self.tokens_per_page
        self.ledger.hold(parent, self.ledger.held(parent) - tokens)
        self.ledger.hold(child, tokens)
        src, dst = self.slot_start(self.slot_of[parent.seq_id]), self.slot_start(slot)
        n = parent.num_computed
        self.ops.copies += list(zip(range(src, src + n), range(dst, dst + n)))

    def commit(self, seq: Sequence) -> None:
        """Nothing to publish: a slot has no prefix cache."""

    # -- addressing --------------------------------------------------------------------------
    def slot_start(self, slot: int) -> int:
        """The cache slot (token index within a plane) where request slot ``slot`` begins."""
        return self.anchor_tokens + slot * self.slot_tokens

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        base = self.slot_start(self.slot_of[seq.seq_id])
        return np.arange(base + start, base + end, dtype=np.int64)

    def _starts(self, seqs: list[Sequence], dtype: type) -> np.ndarray:
        slots = np.fromiter((self.slot_of[s.seq_id] for s in seqs), dtype=np.int64, count=len(seqs))
        return (slots * self.slot_tokens + self.anchor_tokens).astype(dtype, copy=False)

    def decode_slots(self, seqs: list[Sequence], positions: np.ndarray) -> np.ndarray:
        return self._starts(seqs, np.int64) + positions

    def addressing(self, seqs: list[Sequence]) -> tuple[None, np.ndarray]:
        return None, self._starts(seqs, np.int32)

    def max_blocks_per_seq(self, max_model_len: int) -> int:
        return 0

    def kv_stats(self, head: Sequence | None) -> KVStats:
        """Counters only. Any free group backs any page of any slot, so nothing is external fragmentation."""
        free = self.num_free_groups * self.tokens_per_page
        return KVStats(
            capacity=self.capacity, stored=self.ledger.stored, allocated=self.capacity - free, free=free,
            largest_free_extent=free if self.free_slots else 0,
        )

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Every group is unmapped, idle or held, exactly once; held pages are a mapped prefix of their slot;
        slots are free or owned, exactly once (tests call this)."""
        owners = dict(self.slot_of)
        holdings = [(s, n) for s, n in ((self.slot_of[i], self.held[i]) for i in self.slot_of)]
        holdings += [r for rs in self.spare.values() for r in rs]
        slots = [s for s, _ in holdings] + list(self.free_slots)
        assert sorted(slots) == list(range(self.num_request_slots)), "a request slot is lost or owned twice"
        groups = list(self.unmapped) + list(self.idle.values())
        for slot, pages in holdings:
            row = self.page_of[slot, :pages]
            assert (row >= 0).all(), f"slot {slot} holds {pages} pages but not all are mapped"
            groups += row.tolist()
            assert not any((slot, p) in self.idle for p in range(pages)), f"a held page of slot {slot} is idle"
        assert sorted(groups) == list(range(self.num_groups)), "a page group is lost or in two places"
        mapped = {(int(s), int(p)): int(self.page_of[s, p]) for s, p in zip(*np.nonzero(self.page_of >= 0))}
        expected = {(s, p): int(self.page_of[s, p]) for s, n in holdings for p in range(n)} | self.idle
        assert mapped == expected, "page table out of step with the held and idle pages"
        assert self.deferred_reclamation or not self.idle, "an idle page without deferred reclamation"
        for slot in range(self.num_request_slots):
            assert self.idle_count[slot] == sum(1 for s, _ in self.idle if s == slot), f"idle count of slot {slot}"
        assert set(owners) <= {s.seq_id for s in seqs}, "a slot outlived its sequence"
        for seq in seqs:
            if seq.seq_id in self.slot_of:
                assert seq.num_computed <= self.held[seq.seq_id] * self.tokens_per_page, "tokens past the mapped pages"
        owned = {i: (self.held[i] + sum(n for _, n in self.spare.get(i, []))) * self.tokens_per_page
                 for i in self.slot_of}
        self.ledger.check(owned, sum(s.num_computed for s in seqs if s.seq_id in self.slot_of))
