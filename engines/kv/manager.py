"""The KV-manager interface the shared scheduler and model runner talk to.

The paged and contiguous engines differ in exactly this: how a sequence's KV slots are
found and addressed. Everything else (scheduler, runner, model, sampler) is shared.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from engines.base import KVStats
from engines.kv.accounting import KVLedger
from engines.sequence import Sequence


@dataclass
class CacheOps:
    """Cache data moves the runner must perform, in this order, before the step's forward pass."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    # Virtual-contiguous storage (engines.kv.virtual_manager): pages to unmap, then page groups to map (a forked
    # sample's pages are mapped before its prompt is copied in).
    unmaps: list[tuple[int, int]] = field(default_factory=list)  # (request slot, page)
    maps: list[tuple[int, int, int]] = field(default_factory=list)  # (request slot, page, page group)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) within the device cache
    copy_block_size: int = 1  # slots per unit in ``copies``

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.copies or self.unmaps or self.maps)


class KVManager(abc.ABC):
    """Owns the mapping from sequences to KV slots; never touches tensors itself.

    Every change of a sequence's allocation goes through ``self.ledger.hold``, so that the
    memory counters (and the per-step log the KV breakdown is computed from) stay exact
    without walking the cache.
    """

    capacity: int  # token slots
    block_size: int  # the addressing granularity the kernels see (1 for contiguous)
    supports_swap: bool = False

    def __init__(self) -> None:
        self.ops = CacheOps(copy_block_size=self.block_size)
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        self.num_swapped_out = 0
        self.ledger = KVLedger()

    def take_ops(self) -> CacheOps:
        ops, self.ops = self.ops, CacheOps(copy_block_size=self.block_size)
        return ops

    @abc.abstractmethod
    def can_ever_fit(self, seq: Sequence) -> bool:
        """Whether the sequence, alone in an empty cache, could run to its longest possible end."""

    @abc.abstractmethod
    def admit(self, seq: Sequence) -> None:
        """First admission (or re-admission after recompute): find cached prefix blocks, reserve what the policy reserves."""

    @abc.abstractmethod
    def allocate(self, seq: Sequence, num_new: int) -> bool:
        """Make room for ``num_new`` more tokens after ``seq.num_computed``; False if memory is short."""

    @abc.abstractmethod
    def free(self, seq: Sequence) -> None: ...

    @abc.abstractmethod
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` a copy of ``parent``'s cached tokens (shared blocks, or copied slots)."""

    @abc.abstractmethod
    def commit(self, seq: Sequence) -> None:
        """Called after a step computed more of ``seq``: e.g. publish its full blocks to the prefix cache."""

    def commit_many(self, seqs: list[Sequence]) -> None:
        """``commit`` each of ``seqs`` (one call for a step's decodes)."""
        for seq in seqs:
            self.commit(seq)

    @abc.abstractmethod
    def slot_mapping(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Slots of positions start..end-1 of ``seq``."""

    @abc.abstractmethod
    def decode_slots(self, seqs: list[Sequence], positions: np.ndarray) -> np.ndarray:
        """Slots of ``positions`` ([..., B]: column i holds positions of ``seqs[i]``, all allocated)."""

    @abc.abstractmethod
    def addressing(self, seqs: list[Sequence]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(block_tables [B, max_blocks], None) for paging, (None, seq_starts [B]) for an arena."""

    @abc.abstractmethod
    def max_blocks_per_seq(self, max_model_len: int) -> int:
        """Width of a block table row (static for CUDA graphs); 0 without block tables."""

    @abc.abstractmethod
    def kv_stats(self, head: Sequence | None) -> KVStats:
        """The memory counters now; ``head`` is the sequence first in line to be admitted, if any."""

    def swap_out(self, seq: Sequence) -> bool:
        raise NotImplementedError(f"{type(self).__name__} cannot swap")

    def swap_in(self, seq: Sequence) -> bool:
        raise NotImplementedError(f"{type(self).__name__} cannot swap")
