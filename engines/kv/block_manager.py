"""Paged KV memory: fixed-size blocks, ref counts, block tables, prefix caching, copy-on-write.

A block that no sequence holds sits in the free queue, least recently freed first. If it
holds a full block of tokens it stays findable in the prefix cache (hash of its tokens
chained with its parent's hash, verified against the tokens on a hit) until the free
queue hands it out again. Samples of one request (n > 1) share blocks; a write into a
shared block first copies it. Swapped-out sequences keep their data in a host pool.

With a sliding window (Mistral's), a block whose every token has left the window of the
sequence's next query is freed: its table entry becomes a *ghost*, which keeps the block's
hash (the prefix-cache chain of later blocks) and no memory. The kernels never read a key
outside the window, so a ghost's stale block id in the block-table array is never followed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engines.base import KVStats
from engines.kv.manager import KVManager
from engines.sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int  # -1: a ghost (a freed block left behind by a sliding window), in no pool
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and published
    tokens: tuple[int, ...] = ()  # the tokens behind ``hash``, to verify a hit

    @property
    def ghost(self) -> bool:
        return self.block_id < 0


class BlockPool:
    """Blocks, their ref counts, the free queue (LRU) and the prefix-cache index.

    ``num_cached_free`` (free blocks a prefix lookup can still find) is kept up to date as
    blocks move, never counted by walking the index: it is sampled every step.
    """

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, Block] = {}
        self.num_cached_free = 0

    def _indexed(self, block: Block) -> bool:
        return block.hash is not None and self.cached.get(block.hash) is block

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self) -> Block:
        """The least recently freed block, dropped from the prefix cache if it was in it."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._indexed(block):
                del self.cached[block.hash]
                self.num_cached_free -= 1
            block.hash, block.tokens = None, ()
        block.ref_count = 1
        return block

    def acquire(self, block: Block) -> None:
        """Add a holder to a block (a prefix hit, or a forked sample)."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
            self.num_cached_free -= self._indexed(block)
        block.ref_count += 1

    def release(self, block: Block) -> None:
        assert block.ref_count > 0, f"block {block.block_id} released more often than acquired"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block.block_id] = None
            self.num_cached_free += self._indexed(block)

    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        return block if block is not None and block.tokens == tokens else None

    def publish(self, block: Block, block_hash: int, tokens: tuple[int, ...]) -> None:
        block.hash, block.tokens = block_hash, tokens
        self.cached.setdefault(block_hash, block)


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockTableArray:
    """Every live sequence's block ids as a row of one numpy array, updated in place.

    A step's block tables are then one slice of rows instead of a Python loop over every
    block of every sequence (which costs milliseconds at hundreds of sequences).
    """

    def __init__(self, width: int, rows: int = 64) -> None:
        self.array = np.zeros((rows, max(width, 1)), dtype=np.int32)
        self.free_rows = list(range(rows))[::-1]
        self.row_of: dict[int, int] = {}

    def assign(self, seq_id: int, block_ids: list[int]) -> None:
        if not self.free_rows:
            old = self.array.shape[0]
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self.free_rows.pop()
        self.row_of[seq_id] = row
        self.array[row, : len(block_ids)] = block_ids

    def set(self, seq_id: int, index: int, block_id: int) -> None:
        self.array[self.row_of[seq_id], index] = block_id

    def release(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    def rows(self, seq_ids: list[int], width: int) -> np.ndarray:
        return self.array[[self.row_of[i] for i in seq_ids], :width]


class PagedKVManager(KVManager):
    supports_swap = True

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_model_len: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
        window: int | None = None,
        max_step_tokens: int = 1,
        publish_lag: int = 0,
    ) -> None:
        self.block_size = block_size
        super().__init__()
        self.num_blocks = num_blocks
        self.capacity = num_blocks * block_size
        self.pool = BlockPool(num_blocks)
        self.num_host_blocks = num_host_blocks
        self.host_free = list(range(num_host_blocks))[::-1]
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[int, list[Block]] = {}  # seq_id -> its blocks, in order
        self.host_tables: dict[int, list[int]] = {}  # seq_id -> host blocks of a swapped-out sequence
        self.num_published: dict[int, int] = {}  # seq_id -> leading blocks already in the prefix cache
        self.table_array = BlockTableArray(self.blocks_for(max_model_len))
        self.window = window  # the model's sliding window (None: attention sees the whole context)
        self.num_dropped: dict[int, int] = {}  # seq_id -> leading table entries that are ghosts
        # Unfilled slots of shared blocks counted once per holder beyond the first: samples forked from a prompt
        # share its part-filled last block until each writes into it (copy-on-write). The ledger's per-holder
        # ``owned - stored`` counts those slots once per holder; token states subtract it once (``kv_stats``).
        self.shared_unfilled = 0
        # With a window, the most blocks one sequence holds at once: the window's keys (and those of its blocks
        # not published yet, at most ``publish_lag`` tokens), a step's new tokens, and the blocks they straddle.
        self.window_blocks = None if window is None else -(-(window + publish_lag + max_step_tokens) // block_size) + 2

    # -- admission and growth ----------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, seq: Sequence) -> bool:
        needed = self.blocks_for(seq.final_len_bound)
        return (needed if self.window_blocks is None else min(needed, self.window_blocks)) <= self.num_blocks

    def admit(self, seq: Sequence) -> None:
        table: list[Block] = []
        if self.enable_prefix_caching and seq.request.sampling_params.prompt_logprobs is None:
            bs = self.block_size
            parent = None
            # at least one token must be computed, to give the step logits to sample from
            for i in range((seq.num_tokens - 1) // bs):
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                block = self.pool.lookup(chain_hash(parent, tokens), tokens)
                if block is None:
                    break
                self.pool.acquire(block)
                table.append(block)
                parent = block.hash
            self.num_prefix_queries += seq.num_prompt
            self.num_prefix_hits += min(len(table) * bs, seq.num_prompt)
        self.tables[seq.seq_id] = table
        self.table_array.assign(seq.seq_id, [b.block_id for b in table])
        self.num_published[seq.seq_id] = len(table)
        seq.num_computed = len(table) * self.block_size
        seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt)
        self.ledger.hold(seq, seq.num_computed)

    def _slide(self, seq: Sequence, table: list[Block]) -> None:
        """Free the blocks no query of ``seq`` from ``num_computed`` on can see: every key of them is at or before
        ``num_computed - window``. With prefix caching only published ones (their hash chains the next blocks)."""
        bs = self.block_size
        keep_from = min((seq.num_computed - self.window + 1) // bs, len(table))
        if self.enable_prefix_caching:
            keep_from = min(keep_from, self.num_published.get(seq.seq_id, 0))
        done = self.num_dropped.get(seq.seq_id, 0)
        if keep_from <= done:
            return
        for i in range(done, keep_from):
            self._release(seq, i, table[i])
            table[i] = Block(-1, hash=table[i].hash)
            self.table_array.set(seq.seq_id, i, -1)
        self.num_dropped[seq.seq_id] = keep_from
        self.ledger.hold(seq, (len(table) - keep_from) * bs)
        self.ledger.forget(seq, (keep_from - done) * bs)

    def _unfilled(self, seq: Sequence, index: int) -> int:
        """Slots of block ``index`` of ``seq``'s table that hold none of its tokens."""
        return self.block_size - min(max(seq.num_computed - index * self.block_size, 0), self.block_size)

    def _release(self, seq: Sequence, index: int, block: Block) -> None:
        """``seq`` lets go of the block at ``index`` of its table."""
        if block.ref_count > 1:
            self.shared_unfilled -= self._unfilled(seq, index)
        self.pool.release(block)

    def allocate(self, seq: Sequence, num_new: int) -> bool:
        table = self.tables[seq.seq_id]
        if self.window is not None:
            self._slide(seq, table)
        bs = self.block_size
        end = seq.num_computed + num_new
        if end <= len(table) * bs and num_new == 1 and table[seq.num_computed // bs].ref_count == 1:
            return True  # the common decode: room in an unshared last block
        first_written = seq.num_computed // bs
        shared = [i for i in range(first_written, len(table)) if table[i].ref_count > 1]
        needed = max(0, self.blocks_for(seq.num_computed + num_new) - len(table)) + len(shared)
        if needed > self.pool.num_free:
            return False
        for i in shared:  # copy-on-write before this sequence writes into a block others hold
            fresh = self.pool.take()
            self.num_published[seq.seq_id] = min(self.num_published.get(seq.seq_id, 0), i)
            self.ops.copies.append((table[i].block_id, fresh.block_id))
            self._release(seq, i, table[i])
            table[i] = fresh
            self.table_array.set(seq.seq_id, i, fresh.block_id)
        grown = False
        while len(table) < self.blocks_for(seq.num_computed + num_new):
            block = self.pool.take()
            self.table_array.set(seq.seq_id, len(table), block.block_id)
            table.append(block)
            grown = True
        if grown:
            self.ledger.hold(seq, (len(table) - self.num_dropped.get(seq.seq_id, 0)) * bs)
        return True

    def free(self, seq: Sequence) -> None:
        self.ledger.hold(seq, 0)
        table = self.tables.pop(seq.seq_id, None)
        self.table_array.release(seq.seq_id)
        self.num_published.pop(seq.seq_id, None)
        self.num_dropped.pop(seq.seq_id, None)
        if table is not None:
            for i in reversed(range(len(table))):  # tail blocks are the least likely prefix: evicted first
                if not table[i].ghost:
                    self._release(seq, i, table[i])
        host = self.host_tables.pop(seq.seq_id, None)
        if host is not None:
            self.host_free.extend(host)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        table = list(self.tables[parent.seq_id])
        for i, block in enumerate(table):
            if not block.ghost:
                self.pool.acquire(block)
                self.shared_unfilled += self._unfilled(parent, i)
        dropped = self.num_dropped.get(parent.seq_id, 0)
        self.tables[child.seq_id] = table
        self.table_array.assign(child.seq_id, [b.block_id for b in table])
        self.num_published[child.seq_id] = self.num_published.get(parent.seq_id, 0)
        self.ledger.hold(child, (len(table) - dropped) * self.block_size)
        if dropped:
            self.num_dropped[child.seq_id] = dropped
            self.ledger.forget(child, dropped * self.block_size)

    def commit(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        table, bs = self.tables[seq.seq_id], self.block_size
        done = self.num_published[seq.seq_id]
        if done >= seq.num_computed // bs:
            return
        parent = table[done - 1].hash if done else None
        for i in range(done, seq.num_computed // bs):
            block = table[i]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.pool.publish(block, chain_hash(parent, tokens), tokens)
            parent = block.hash
        self.num_published[seq.seq_id] = max(done, seq.num_computed // bs)

    # -- swapping ----------------------------------------------------------------------------
    def swap_out(self, seq: Sequence) -> bool:
        table = self.tables[seq.seq_id]
        assert not self.num_dropped.get(seq.seq_id), "a sliding window's ghosts cannot be swapped (start-up refuses)"
        if len(table) > len(self.host_free):
            return False
        host = [self.host_free.pop() for _ in table]
        self.ops.swap_out += [(b.block_id, h) for b, h in zip(table, host)]
        self.free(seq)
        self.host_tables[seq.seq_id] = host
        self.num_swapped_out += 1
        return True

    def swap_in(self, seq: Sequence) -> bool:
        host = self.host_tables[seq.seq_id]
        # room for its blocks plus the next token
        if self.blocks_for(seq.num_computed + 1) > self.pool.num_free:
            return False
        table = [self.pool.take() for _ in host]
        self.ops.swap_in += [(h, b.block_id) for h, b in zip(host, table)]
        self.host_free.extend(self.host_tables.pop(seq.seq_id))
        self.tables[seq.seq_id] = table
        self.table_array.assign(seq.seq_id, [b.block_id for b in table])
        self.num_published[seq.seq_id] = 0  # commit() re-publishes its full blocks, hash chain intact
        self.ledger.hold(seq, len(table) * self.block_size)
        return True

    # -- addressing --------------------------------------------------------------------------
    def slot_mapping(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        bs = self.block_size
        pos = np.arange(start, end)
        row = self.table_array.array[self.table_array.row_of[seq.seq_id]]
        return row[pos // bs].astype(np.int64) * bs + pos % bs

    def decode_slots(self, seqs: list[Sequence], positions: np.ndarray) -> np.ndarray:
        bs = self.block_size
        rows = np.fromiter((self.table_array.row_of[s.seq_id] for s in seqs), dtype=np.int64, count=len(seqs))
        blocks = self.table_array.array[rows, positions // bs]
        return blocks.astype(np.int64) * bs + positions % bs

    def addressing(self, seqs: list[Sequence]) -> tuple[np.ndarray, None]:
        width = max((len(self.tables[s.seq_id]) for s in seqs), default=1) or 1
        return self.table_array.rows([s.seq_id for s in seqs], width), None

    def max_blocks_per_seq(self, max_model_len: int) -> int:
        return self.blocks_for(max_model_len)

    def kv_stats(self, head: Sequence | None) -> KVStats:
        """Counters only: every free block serves any demand, so nothing is external fragmentation."""
        bs = self.block_size
        allocated = (self.num_blocks - self.pool.num_free) * bs
        free = self.pool.num_free * bs
        return KVStats(
            capacity=self.capacity, stored=allocated - (self.ledger.owned - self.ledger.stored) + self.shared_unfilled,
            allocated=allocated,
            free=free, largest_free_extent=free, cached=self.pool.num_cached_free * bs,
            num_swapped_out=self.num_swapped_out, prefix_cache_queries=self.num_prefix_queries,
            prefix_cache_hits=self.num_prefix_hits,
        )

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Ref counts equal the holders, free + held = total, no block both free and held (tests call this)."""
        holders: dict[int, int] = {}
        for s in seqs:
            table = self.tables.get(s.seq_id, [])
            dropped = self.num_dropped.get(s.seq_id, 0)
            assert all(b.ghost == (i < dropped) for i, b in enumerate(table)), "ghosts are not the table's front"
            for b in table[dropped:]:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        assert set(self.tables) <= {s.seq_id for s in seqs}, "a block table outlived its sequence"
        for block in self.pool.blocks:
            assert block.ref_count == holders.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count} but {holders.get(block.block_id, 0)} holders")
            assert (block.ref_count == 0) == (block.block_id in self.pool.free_queue), (
                f"block {block.block_id} is free xor unreferenced")
        assert self.pool.num_free + len(holders) == self.num_blocks
        for h, block in self.pool.cached.items():
            assert block.hash == h, "prefix index points at a block that no longer holds that hash"
        for seq_id, table in self.tables.items():
            row = self.table_array.array[self.table_array.row_of[seq_id], : len(table)]
            assert row.tolist() == [b.block_id for b in table], "block table array out of step with the tables"
        host = self.host_free + [h for table in self.host_tables.values() for h in table]
        assert sorted(host) == list(range(self.num_host_blocks)), "a host block is lost or held twice"
        assert self.pool.num_cached_free == sum(1 for b in self.pool.cached.values() if b.ref_count == 0), (
            "cached-free counter out of step with the prefix index")
        filled: dict[int, int] = {}  # block id -> the tokens it holds (the most any holder has written)
        for s in seqs:
            for i, b in enumerate(self.tables.get(s.seq_id, [])):
                if not b.ghost:
                    here = self.block_size - self._unfilled(s, i)
                    filled[b.block_id] = max(filled.get(b.block_id, 0), here)
        assert self.kv_stats(None).stored == sum(filled.values()), (
            f"token states {self.kv_stats(None).stored}, but the blocks hold {sum(filled.values())}")
        owned = {i: (len(t) - self.num_dropped.get(i, 0)) * self.block_size for i, t in self.tables.items()}
        self.ledger.check(owned, sum(s.num_computed - self.ledger.forgotten(s) for s in seqs if s.seq_id in self.tables))
