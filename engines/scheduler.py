"""Continuous batching, shared by the paged and contiguous engines.

Each step: the running sequences' decodes first (one token each, oldest first; when the
KV manager is out of memory the newest running sequence is preempted, by recompute or
by swap), then prompt chunks of running sequences, then swapped-out sequences coming
back, then waiting ones in arrival order (FCFS: the first that does not fit stops
admission), all within a token budget (chunked prefill) and a cap on running sequences.
The cap is hard: a request with n samples is admitted only with seats for all n, since its
samples join the running set when its prompt completes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engines.kv.manager import KVManager
from engines.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    decode_steps: list[int] = field(default_factory=list)  # decode steps of each sequence in ``decodes``
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(
        self,
        kv: KVManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        preemption_mode: str,
        num_scheduler_steps: int = 1,
    ) -> None:
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {preemption_mode!r}")
        if preemption_mode == "swap" and not kv.supports_swap:
            raise ValueError(f"{kv.__class__.__name__} cannot swap: use preemption_mode=recompute")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.num_scheduler_steps = num_scheduler_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the first to be preempted
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_pending_forks = 0  # samples of running prompts that will join the running set

    def free_seats(self) -> int:
        return self.max_num_seqs - len(self.running) - self.num_pending_forks

    def _run(self, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self.num_pending_forks += seq.num_forks

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.num_pending_forks -= seq.num_forks

    def forked(self, child: Sequence) -> None:
        """A sample forked from a prompt that completed: it takes the seat its prompt kept for it."""
        self.num_pending_forks -= 1
        child.status = SeqStatus.RUNNING
        self.running.append(child)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def live(self) -> list[Sequence]:
        return [*self.running, *self.swapped, *self.waiting]

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule()
        batch.decode_steps = [1] * len(batch.decodes)
        if self.num_scheduler_steps > 1 and batch.decodes and not batch.prefills and not batch.preempted:
            self._look_ahead(batch)
        return batch

    def _look_ahead(self, batch: ScheduledBatch) -> None:
        """Let a decode-only batch run several steps on the device: each sequence up to its
        remaining length, where memory allows without preempting (sampling penalties read the
        tokens of every step, so a batch with penalties runs one step)."""
        for seq in batch.decodes:
            p = seq.request.sampling_params
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                return
        for i, seq in enumerate(batch.decodes):
            p = seq.request.sampling_params
            left = min(p.max_tokens - seq.num_output, seq.stream.max_model_len - seq.num_tokens)
            steps = max(1, min(self.num_scheduler_steps, left))
            if steps > 1 and self.kv.allocate(seq, steps):
                batch.decode_steps[i] = steps

    def _schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.token_budget
        for seq in [s for s in self.running if s.is_decoding]:
            if seq.status is not SeqStatus.RUNNING or seq.is_done_pending:  # preempted in this loop, or finishing
                continue
            if self._make_room(seq, 1, batch):
                batch.decodes.append(seq)
                budget -= 1
        for seq in [s for s in self.running if not s.is_decoding]:
            n = self._chunk(seq, budget)
            if seq.status is SeqStatus.RUNNING and n and self._make_room(seq, n, batch):
                batch.prefills.append((seq, n))
                budget -= n
        if batch.preempted:
            return batch
        while self.swapped and budget > 0:
            seq = self.swapped[0]
            if self.free_seats() < 1 + seq.num_forks or not self.kv.swap_in(seq):
                break
            self.swapped.popleft()
            self._run(seq)
            if not seq.is_decoding:  # a prompt swapped out part-way: it goes on with its next chunk
                n = self._chunk(seq, budget)
                if n and self.kv.allocate(seq, n):
                    batch.prefills.append((seq, n))
                    budget -= n
                continue
            if not self.kv.allocate(seq, 1):  # swap_in left room for this token
                raise AssertionError("swap-in did not leave room for the next token")
            batch.decodes.append(seq)
            budget -= 1
        while self.waiting and not self.swapped and budget > 0:
            seq = self.waiting[0]
            if self.free_seats() < 1 + seq.num_forks:
                break
            self.kv.admit(seq)
            n = self._chunk(seq, budget)
            if not n or not self.kv.allocate(seq, n):
                self.kv.free(seq)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self._run(seq)
            batch.prefills.append((seq, n))
            budget -= n
        return batch

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of this sequence to compute now: a chunk of the budget, or all of it or nothing."""
        if self.chunked:
            return min(seq.num_uncomputed, budget)
        return seq.num_uncomputed if seq.num_uncomputed <= budget else 0

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Allocate for ``seq``, preempting the newest running sequences not yet in this step's
        batch until it fits; if ``seq`` itself is the newest left, it is preempted instead."""
        while not self.kv.allocate(seq, n):
            scheduled = {id(s) for s in batch.decodes} | {id(s) for s, _ in batch.prefills}
            victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        self.num_preemptions += 1
        if self.preemption_mode == "swap" and self.kv.swap_out(seq):
            seq.status = SeqStatus.SWAPPED
            self.swapped.append(seq)
            return
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Free ``seq``'s memory and take it out of whichever queue holds it: usually running; waiting or swapped
        if it was preempted while its last token was in flight (asynchronous scheduling), or aborted there."""
        self.kv.free(seq)
        if seq.status is SeqStatus.RUNNING:
            self._stop_running(seq)
        elif seq.status is SeqStatus.SWAPPED:
            self.swapped.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sample of a request wherever it is; its memory is free on return."""
        dropped = [s for s in self.live if s.request.request_id == request_id]
        for seq in dropped:
            self.finish(seq)
        return dropped
