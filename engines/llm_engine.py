"""The engine loop shared by the paged and contiguous engines: schedule -> run -> postprocess.

Subclasses only choose the KV manager; model, scheduler, runner and sampler are the same
code, so a difference between the two engines is a difference of KV memory management.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path

import numpy as np
import torch

from engines.base import Engine, KVStats
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.kv.manager import KVManager
from engines.kv.metadata import StepSequence, build_metadata
from engines.kv.storage import KVStorage
from engines.model.decoder import CausalLM
from engines.model.loader import load_model, resolve_device
from engines.model.parallel import check_divides
from engines.model_runner import LaunchedStep, ModelRunner, SampleRow
from engines.piecewise_graphs import PieceBuffers
from engines.request import Request, RequestError, RequestOutput, SamplingParams, TokenLogprob
from engines.sampling import sample_seed, uses_history
from engines.scheduler import ScheduledBatch, Scheduler
from engines.sequence import Sequence, SeqStatus
from engines.step_clock import StepClock
from engines.tensor_parallel.driver import ShardedModel


# The all-reduce the roofline's communication term is timed at: as large as a full step's hidden states (8,192 tokens
# of a 70B's 8,192-wide bf16 rows), where the bus bandwidth is near its peak; a decode step's all-reduces are smaller
ALL_REDUCE_PROBE_BYTES = 128 * 2**20


class LLMEngine(Engine):
    samples_kv_itself = True
    supports_logprobs = True

    def __init__(self, model_dir: str | Path, cfg: PagedConfig | ContiguousConfig | VAttentionConfig) -> None:
        super().__init__(model_dir, cfg.max_model_len)
        self.cfg = cfg
        self._check_config()
        self.device = resolve_device(cfg.device)
        self.runner: ModelRunner | None = None
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not read yet (asynchronous scheduling)
        self.startup_s: dict[str, float] = {}  # seconds of each start-up phase (a 70B over two GPUs takes a while)
        start = time.perf_counter()
        self.model = self._load_model()
        self.startup_s["load"] = time.perf_counter() - start
        try:
            self._build()
        except BaseException:  # the workers of a tensor-parallel model stop with it
            self.close()
            raise

    def _build(self) -> None:
        """Size the KV cache and build the manager, scheduler and runner around the loaded model; warm up on a GPU."""
        cfg, mc = self.cfg, self.model_config
        # one token's K and V on one GPU: its share of the KV heads (tensor parallel); the token capacity is the same
        # on every GPU
        self.slot_bytes = 2 * mc.num_layers * self.model.num_kv_heads * mc.head_dim * self.model.dtype.itemsize
        lap = time.perf_counter()
        num_slots = self._kv_slots()
        self.startup_s["kv_sizing"] = time.perf_counter() - lap
        self.clock = StepClock(self.device, enabled=cfg.step_anatomy)
        self.kv = self.clock.wrap(self.make_kv_manager(num_slots))  # its calls during a step time as `kv`
        self.ledger = self.kv.ledger
        self.ledger.record = cfg.record_kv_steps
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            enable_chunked_prefill=cfg.enable_chunked_prefill, preemption_mode=cfg.preemption_mode,
            num_scheduler_steps=cfg.num_scheduler_steps,
        )
        lap = time.perf_counter()
        self.runner = ModelRunner(
            self.model, self.kv, num_slots=self.kv.capacity, num_host_slots=self.host_slots(self.kv.block_size),
            max_model_len=self.max_model_len, use_cuda_graphs=not cfg.enforce_eager,
            cuda_graph_max_batch=min(cfg.cuda_graph_max_batch, cfg.max_num_seqs),
            cuda_graph_max_tokens=self._piecewise_max_tokens(), cuda_graph_token_step=cfg.cuda_graph_token_step,
            clock=self.clock,
            logprobs_mode=cfg.logprobs_mode, storage=self.make_kv_storage(),
        )
        self.startup_s["runner_and_graphs"] = time.perf_counter() - lap
        if self.device.type == "cuda":
            lap = time.perf_counter()
            self._warm_up()
            self.startup_s["warm_up"] = time.perf_counter() - lap

    def _load_model(self) -> CausalLM | ShardedModel:
        """The model, or over ``tensor_parallel_size`` devices rank 0's shard with the workers holding the rest."""
        c = self.cfg
        if c.tensor_parallel_size == 1:
            return load_model(self.model_dir, dtype=c.dtype, device=self.device, attn_backend=c.attn_backend)
        return ShardedModel(str(self.model_dir), size=c.tensor_parallel_size, dtype=c.dtype, device=self.device,
                            attn_backend=c.attn_backend, timeout_s=c.distributed_timeout_s)

    def tensor_parallel(self) -> dict:
        """GPUs the model is split over, KV memory per GPU and over all of them (each GPU holds its KV heads of every
        token), and, split, the group's backend and all-reduce bus bandwidth (NCCL's own measure, at
        ``ALL_REDUCE_PROBE_BYTES``)."""
        size, per_gpu = self.cfg.tensor_parallel_size, self.kv.capacity * self.slot_bytes
        info = {"tensor_parallel_size": size, "kv_gib_per_gpu": per_gpu / 2**30, "kv_gib_total": per_gpu * size / 2**30,
                "kv_token_slots": self.kv.capacity, "startup_s": dict(self.startup_s)}
        if isinstance(self.model, ShardedModel):
            info["backend"] = self.model.backend
            if self.model.backend == "nccl":
                info["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
            info["all_reduce_bus_bytes_per_s"] = self.model.all_reduce_bus_bandwidth(ALL_REDUCE_PROBE_BYTES)
        return info

    @classmethod
    def from_config(cls, model_dir: str | Path, cfg) -> "LLMEngine":
        return cls(model_dir, cfg)

    @abc.abstractmethod
    def make_kv_manager(self, num_slots: int) -> KVManager: ...

    def make_kv_storage(self) -> KVStorage | None:
        """The memory under the cache tensor; None: an ordinary allocation of the manager's capacity."""
        return None

    def after_launch(self, batch: ScheduledBatch) -> None:
        """KV work that can run while the device runs the step just launched (none by default)."""

    # -- sizing ------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.cfg
        problems = [
            (c.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {c.max_num_seqs}"),
            (c.max_num_batched_tokens >= c.max_num_seqs,
             f"max_num_batched_tokens ({c.max_num_batched_tokens}) must be >= max_num_seqs ({c.max_num_seqs})"),
            (c.enable_chunked_prefill or c.max_num_batched_tokens >= self.max_model_len,
             f"without chunked prefill max_num_batched_tokens ({c.max_num_batched_tokens}) must be >= max_model_len "
             f"({self.max_model_len})"),
            (0 < c.gpu_memory_utilization <= 1, f"gpu_memory_utilization must be in (0, 1], got {c.gpu_memory_utilization}"),
            (c.kv_budget_gb is None or c.kv_budget_gb > 0, f"kv_budget_gb must be > 0, got {c.kv_budget_gb}"),
            (c.num_kv_slots is None or c.num_kv_slots > 0, f"num_kv_slots must be > 0, got {c.num_kv_slots}"),
            (c.swap_space >= 0, f"swap_space must be >= 0, got {c.swap_space}"),
            (c.num_scheduler_steps >= 1, f"num_scheduler_steps must be >= 1, got {c.num_scheduler_steps}"),
            (c.logprobs_mode in ("raw", "processed"), f"logprobs_mode must be raw or processed, got {c.logprobs_mode!r}"),
            (c.distributed_timeout_s > 0, f"distributed_timeout_s must be > 0, got {c.distributed_timeout_s}"),
            (c.cuda_graph_max_batch >= 1, f"cuda_graph_max_batch must be >= 1, got {c.cuda_graph_max_batch}"),
            (c.cuda_graph_max_tokens is None or c.cuda_graph_max_tokens >= 0,
             f"cuda_graph_max_tokens must be >= 0 (0: no piecewise graphs), got {c.cuda_graph_max_tokens}"),
            (c.cuda_graph_token_step >= 1, f"cuda_graph_token_step must be >= 1, got {c.cuda_graph_token_step}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)
        check_divides(self.model_config, c.tensor_parallel_size)

    def _piecewise_max_tokens(self) -> int:
        """Tokens the piecewise graphs are captured up to (0: none): at most a step's budget, on a GPU, untensored."""
        c = self.cfg
        if c.enforce_eager or self.device.type != "cuda" or c.tensor_parallel_size > 1:
            return 0
        budget = min(c.max_num_batched_tokens, self.max_model_len * c.max_num_seqs)
        return budget if c.cuda_graph_max_tokens is None else min(c.cuda_graph_max_tokens, budget)

    def _kv_slots(self) -> int:
        """Token slots of KV memory: explicit, a budget in GB, or what the device has left after a profile run."""
        c = self.cfg
        if c.num_kv_slots:
            return c.num_kv_slots
        if c.kv_budget_gb is not None:
            budget = c.kv_budget_gb * 2**30
        elif self.device.type != "cuda":
            budget = c.cpu_kv_budget_gb * 2**30
        else:
            budget = self._profile_free_memory()
        slots = int(budget // self.slot_bytes)
        if slots < 1:
            raise ValueError(f"no KV memory left: the budget of {budget / 2**30:.2f} GiB holds no token")
        return slots

    @torch.no_grad()
    def _profile_free_memory(self) -> float:
        """Run the largest step once and measure the peak, then give the rest of the device (times util) to KV."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.cfg.max_num_batched_tokens, self.max_model_len)
        cache = self.model.allocate_kv_cache(n)
        meta = build_metadata([StepSequence(0, n)], np.arange(n), block_tables=None,
                              seq_starts=np.zeros(1, dtype=np.int32), block_size=1, device=self.device)
        ids = torch.randint(0, self.model_config.vocab_size, (n,), device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), cache, meta)
        rows = min(self.cfg.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows].contiguous())
        logits.softmax(-1).argmax(-1)
        del cache, hidden, logits
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        # The piecewise graphs' pool takes the activations' place (it needs no more than this forward did: its
        # pieces are this forward's, one at a time), but their buffers are memory of their own.
        pieces = PieceBuffers.nbytes(self.model, self._piecewise_max_tokens())
        torch.cuda.empty_cache()  # the graphs' private pool takes its blocks from the device, not from this cache
        return total * self.cfg.gpu_memory_utilization - others - peak - pieces

    def host_slots(self, block_size: int) -> int:
        """Pinned host slots for swapped-out sequences (whole blocks); none unless preemption swaps."""
        if self.cfg.preemption_mode != "swap":
            return 0
        return int(self.cfg.swap_space * 2**30 // self.slot_bytes) // block_size * block_size

    def _warm_up(self) -> None:
        """Compile the kernels a run will need before anyone measures it: prefills of each size
        class the kernels specialize on, steps that mix decodes with a prompt chunk, and decodes;
        then one step as large as the token budget allows, so that the allocator holds what the
        largest step needs before a run (a first allocation of it mid-run would sync the host);
        then forget the warm-up's counters."""
        vocab = min(self.model_config.vocab_size, 1000)
        longest = min(self.cfg.max_num_batched_tokens, self.max_model_len - 8)
        if longest < 1:  # no room for a prompt and the tokens it samples: nothing to warm up with
            return
        lengths = sorted({min(n, longest) for n in (40, 600, 1200, 2400, 4800, 9600)})
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, detokenize=False)
        for i, n in enumerate(lengths):
            if not self._warm_up_request(f"warm-up-{i}", n, i, vocab, params):
                break
            self.step()  # this prompt's prefill; the next one's joins this one's decodes
        while self.has_unfinished():
            self.step()
        fill = min(-(-self.cfg.max_num_batched_tokens // longest), self.cfg.max_num_seqs)
        for i in range(fill):  # one full-budget prefill (as many as KV memory admits at once)
            if not self._warm_up_request(f"warm-up-full-{i}", longest, len(lengths) + i, vocab, params):
                break
        while self.has_unfinished():
            self.step()
        self._warm_up_logits()
        self.scheduler.num_preemptions = 0
        self.kv.num_prefix_queries = self.kv.num_prefix_hits = self.kv.num_swapped_out = 0
        self.ledger.drain()

    @torch.no_grad()
    def _warm_up_logits(self) -> None:
        """The LM head and greedy pick at every number of rows a step may sample: cuBLAS picks a kernel per
        shape, and the first launch of a kernel not yet loaded loads its module, which waits for the device
        (measured on seed_8b: a 140 ms stall of the first 32-row step of a process's first run)."""
        hidden = torch.zeros(self.cfg.max_num_seqs, self.model_config.hidden_size, dtype=self.model.dtype,
                             device=self.device)
        for rows in range(1, self.cfg.max_num_seqs + 1):
            for upcast in (False, True):  # greedy batches pick from the model's dtype, sampled ones from float32
                self.model.compute_logits(hidden[:rows], upcast=upcast).argmax(-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up_request(self, request_id: str, n: int, salt: int, vocab: int, params: SamplingParams) -> bool:
        """Queue an ``n``-token warm-up prompt of its own tokens (no prefix hits); False if it can never fit."""
        try:
            self.add_request(Request(request_id, [(7 * j + salt) % vocab for j in range(n)], params))
        except RequestError:  # a KV budget too small for this size: nothing larger will fit either
            return False
        return True

    # -- the contract ------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.check_request(request)
        p = request.sampling_params
        seq = Sequence(request, 0, self.new_stream(request), self._generator(p.seed, 0), num_forks=p.n - 1)
        if p.n > self.cfg.max_num_seqs:
            raise RequestError(f"request {request.request_id!r} asks for n={p.n} samples, more than max_num_seqs "
                               f"({self.cfg.max_num_seqs}) sequences can run at once")
        if not self.kv.can_ever_fit(seq):
            raise RequestError(
                f"request {request.request_id!r} can never fit in KV memory: it may need "
                f"{seq.final_len_bound} tokens x {p.n} samples, the cache holds {self.kv.capacity} token slots"
            )
        self.scheduler.add(seq)

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(self.device).manual_seed(sample_seed(seed, index))

    def has_unfinished(self) -> bool:
        """A step in flight holds only samples still in the scheduler (a finishing one stays running until its
        last token is read), unless they were aborted: then nothing is left to return."""
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> None:
        dropped = self.scheduler.abort(request_id)
        indices = {s.index for s in dropped}
        for seq in dropped:
            indices.update(range(1, seq.num_forks + 1))  # samples not forked yet
        for i in sorted(indices):
            self.report_aborted(request_id, i, dropped[0].num_prompt)

    def kv_stats(self) -> KVStats:
        waiting = self.scheduler.waiting
        stats = self.kv.kv_stats(waiting[0] if waiting else None)
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting) + len(self.scheduler.swapped)
        stats.num_preemptions = self.scheduler.num_preemptions
        return stats

    def close(self) -> None:
        self._in_flight = None
        try:
            if self.runner is not None:
                self.runner.graphs = None
                self.runner.storage.close()
        finally:  # the workers of a split model stop whatever happened above
            self.runner = None
            if isinstance(self.model, ShardedModel):
                self.model.close()
            self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one step: schedule -> run -> postprocess --------------------------------------------
    def _step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then postprocess the one before it (asynchronous scheduling: the host's
        work for step N+1 overlaps the device's step N) or, when synchronous, this one."""
        self.clock.start()
        batch = self.scheduler.schedule()
        self.clock.lap("schedule")
        previous, self._in_flight = self._in_flight, None
        if not batch:
            if previous is None and self.scheduler.has_unfinished() and not self.scheduler.running:
                raise RuntimeError("scheduler made no progress with requests waiting (a bug: please report)")
            if previous is None:
                return []
            outputs = self._postprocess(previous)
            self.ledger.timed(self.clock.collect())  # its device work is done: the last step's times
            return outputs
        now = time.perf_counter()
        for seq, _ in batch.prefills:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        # after this step's admissions, before its frees; nothing to build when the log is off
        self.ledger.sample(now, self.kv_stats() if self.ledger.record else None)
        self.runner.apply(self.kv.take_ops())
        self.clock.lap("kv")
        rows = self._sample_rows(batch)
        launched = self.runner.launch(batch, rows)
        self._advance(batch, rows)
        self.after_launch(batch)
        self.clock.lap("postprocess")
        outputs = self._postprocess(previous) if previous is not None else []
        if self.cfg.async_scheduling and not self._must_wait(rows):
            self._in_flight = launched
        else:
            outputs += self._postprocess(launched)
        self.ledger.timed(self.clock.finish(self.ledger.step - 1))
        return outputs

    @staticmethod
    def _must_wait(rows: list[SampleRow]) -> bool:
        """Whether the next step needs this one's tokens on the host before it is scheduled: a prompt forking
        its n > 1 samples (they are built from the sampled tokens), or penalties (they read every token)."""
        return any(r.seq is not r.source for r in rows) or uses_history([r.seq.request.sampling_params for r in rows])

    def _advance(self, batch: ScheduledBatch, rows: list[SampleRow]) -> None:
        """What a launched step changes that is known before its tokens are: the K/V it computes, the tokens it
        samples (pending until read), and the prefix blocks its prompt chunks complete."""
        computed = 0
        for seq, n in batch.prefills:
            seq.num_computed += n
            computed += n
            self.kv.commit(seq)
        for seq, k in zip(batch.decodes, batch.decode_steps):
            seq.num_computed += k  # the step caches the K/V of the token before each one it samples
            seq.num_pending += k
            computed += k
        for row in rows:
            if row.seq is row.source and row.seq.num_computed == row.seq.num_tokens:  # a prompt's first sample
                row.seq.num_pending += 1
        self.ledger.computed(computed)

    def _sample_rows(self, batch: ScheduledBatch) -> list[SampleRow]:
        """Who samples this step: every sequence whose last token is computed now, and for a
        prompt that completes with n > 1, its new samples too (from the same logits)."""
        rows = []
        for seq in batch.decodes:
            rows.append(SampleRow(seq, seq))
        for seq, n in batch.prefills:
            if seq.num_computed + n == seq.num_tokens:
                rows.append(SampleRow(seq, seq))
                for i in range(1, seq.num_forks + 1):
                    child = Sequence(seq.request, i, self.new_stream(seq.request),
                                     self._generator(seq.request.sampling_params.seed, i),
                                     first_scheduled_time=seq.first_scheduled_time)
                    rows.append(SampleRow(child, seq))
        return rows

    def _postprocess(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens and hand them to their samples. A sample that finished or was aborted
        while the step was in flight drops them; one preempted meanwhile keeps them for its recompute."""
        result = self.runner.wait(step)
        now = time.perf_counter()
        for (seq, lo, count), values in zip(step.prompt_spans, _chunks(result.prompt_logprobs, step.prompt_spans)):
            if len(seq.prompt_logprobs) == lo:  # else scored already, before a preemption
                k = seq.request.sampling_params.prompt_logprobs
                seq.prompt_logprobs += _token_logprobs(seq.token_ids[lo + 1 : lo + 1 + count], values, k)
        tokens, logprobs = result.tokens, result.logprobs
        outputs = []
        for i, (row, sampled) in enumerate(zip(step.rows, tokens)):
            seq = row.seq
            if seq is row.source:
                seq.num_pending -= len(sampled)
            if seq.status is SeqStatus.FINISHED:
                continue
            if seq is not row.source:  # a new sample: share (or copy) the prompt's cache, then run beside it
                seq.num_computed = row.source.num_computed
                self.kv.fork(row.source, seq)
                self.scheduler.forked(seq)
            first = len(seq.token_ids) == seq.num_prompt
            new, text = [], ""
            for token in sampled:  # a decode that ran several steps brings several tokens
                seq.token_ids.append(token)
                text += seq.stream.append(token)
                new.append(token)
                if seq.stream.finished:
                    break
            outputs.append(RequestOutput(
                request_id=seq.request.request_id, index=seq.index, new_token_ids=new, token_times=[now] * len(new),
                text=text, finished=seq.stream.finished, finish_reason=seq.stream.finish_reason,
                stop_reason=seq.stream.stop_reason, num_prompt_tokens=seq.num_prompt,
                num_cached_tokens=seq.num_cached_prompt if first else 0,
                first_scheduled_time=seq.first_scheduled_time if first else None,
                logprobs=_token_logprobs(new, logprobs[i], seq.request.sampling_params.logprobs)
                if logprobs is not None and seq.request.sampling_params.logprobs is not None else None,
                prompt_logprobs=[None, *row.source.prompt_logprobs]
                if first and seq.request.sampling_params.prompt_logprobs is not None else None,
            ))
        # after their tokens: nothing above reads a decode's commit
        self.kv.commit_many([s for s in step.batch.decodes if s.status is SeqStatus.RUNNING])
        for row in step.rows:
            row.source.num_forks = 0  # its samples are running: scheduler.forked took their seats
        for row in step.rows:
            if row.seq.stream.finished and row.seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(row.seq)
        self.clock.lap("postprocess")
        return outputs


def _token_logprobs(tokens: list[int], values: list[tuple], k: int) -> list[TokenLogprob]:
    """Each token's log-probability and its position's top ``k`` (the step computed the most any row asked for)."""
    return [TokenLogprob(t, lp, tuple(zip(ids[:k], top[:k]))) for t, (lp, ids, top) in zip(tokens, values)]


def _chunks(values: list | None, spans: list[tuple]) -> list[list]:
    """``values`` cut into the spans' counts, in order."""
    out, i = [], 0
    for _, _, count in spans:
        out.append(values[i : i + count])
        i += count
    return out
