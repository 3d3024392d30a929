"""Model-free drivers for the KV managers and the scheduler: sequences built by hand, and the
engine's step loop (engines/llm_engine.py: schedule, compute, commit, sample, fork, finish)
with a stand-in for the model, so that scheduling and memory can be tested in milliseconds."""

from __future__ import annotations

from engines.detokenizer import SampleStream
from engines.kv.manager import KVManager
from engines.request import Request, SamplingParams
from engines.scheduler import ScheduledBatch, Scheduler
from engines.sequence import Sequence


def seq(rid: str, prompt: int | list[int], max_tokens: int, n: int = 1, max_model_len: int = 1024,
        **params) -> Sequence:
    """A request's first sample; ``prompt`` is its token ids or a length (tokens 1..prompt)."""
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    p = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, detokenize=False, **params)
    request = Request(rid, tokens, p)
    return Sequence(request, 0, SampleStream(None, p, len(tokens), (), max_model_len), None, num_forks=n - 1)


def compute(kv: KVManager, s: Sequence, n: int) -> None:
    """What a step does for a prompt chunk of ``n`` tokens that ``kv`` allocated: cache them, then publish."""
    s.num_computed += n
    kv.ledger.computed(n)
    kv.commit(s)


def next_token(s: Sequence) -> int:
    """The stand-in model: a token that depends on the sample and its position, so samples diverge."""
    return (31 * s.num_tokens + 7 * s.index + 3) % 997


class Sim:
    """The engine's step loop over a real Scheduler and KV manager, with ``next_token`` as the model."""

    def __init__(self, kv: KVManager, *, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                 enable_chunked_prefill: bool = True, preemption_mode: str = "recompute",
                 num_scheduler_steps: int = 1) -> None:
        self.kv = kv
        self.scheduler = Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   enable_chunked_prefill=enable_chunked_prefill, preemption_mode=preemption_mode,
                                   num_scheduler_steps=num_scheduler_steps)
        self.finished: list[Sequence] = []
        self.batches: list[ScheduledBatch] = []

    def add(self, s: Sequence) -> Sequence:
        self.scheduler.add(s)
        return s

    def step(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        self.batches.append(batch)
        # the model runner's contract: a decode computes a sequence's one uncomputed token (its last)
        assert all(s.is_decoding for s in batch.decodes), "a sequence with prompt left to compute scheduled as a decode"
        assert all(n <= s.num_uncomputed for s, n in batch.prefills)
        self.kv.take_ops()
        rows: list[tuple[Sequence, Sequence]] = [(s, s) for s in batch.decodes]
        for s, n in batch.prefills:
            if s.num_computed + n == s.num_tokens:
                rows.append((s, s))
                for i in range(1, s.num_forks + 1):
                    p = s.request.sampling_params
                    rows.append((Sequence(s.request, i, SampleStream(None, p, s.num_prompt, (), s.stream.max_model_len),
                                          None), s))
        computed = 0
        for s, n in batch.prefills:
            s.num_computed += n
            computed += n
            self.kv.commit(s)
        steps = {id(s): k for s, k in zip(batch.decodes, batch.decode_steps)}
        for s, source in rows:
            if s is not source:
                s.num_computed = source.num_computed
                self.kv.fork(source, s)
                self.scheduler.forked(s)
            for _ in range(steps.get(id(s), 1)):
                if id(s) in steps:
                    s.num_computed += 1
                    computed += 1
                token = next_token(s)
                s.token_ids.append(token)
                s.stream.append(token)
                if s.stream.finished:
                    break
            if id(s) in steps:
                self.kv.commit(s)
        self.kv.ledger.computed(computed)
        for _, source in rows:
            source.num_forks = 0
        for s, _ in rows:
            if s.stream.finished:
                self.scheduler.finish(s)
                self.finished.append(s)
        return batch

    def run(self, max_steps: int = 10_000, check: bool = True) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
            if check:
                self.kv.check_invariants(self.scheduler.live)
        raise AssertionError("the scheduler made no progress")
