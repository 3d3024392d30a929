"""Runs one scheduled step on the device: cache moves, batched inputs, forward, logits, sampling.

Shared by the paged and contiguous engines; the KV manager supplies slots and addressing.
Pure-decode batches replay CUDA graphs captured for a ladder of batch sizes (the model's
forward with the KV cache and static input buffers); other steps (prompt chunks, larger batches)
replay piecewise graphs of everything but attention (``engines.piecewise_graphs``), or run eagerly
where there are none (graphs off, a tensor-parallel model, more tokens than captured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from engines.kv.manager import CacheOps, KVManager
from engines.kv.metadata import Addressing, AttentionMetadata, DecodeBatch, StepSequence, build_metadata
from engines.kv.storage import KVStorage
from engines.model.decoder import CausalLM
from engines.piecewise_graphs import PiecewiseGraphs
from engines.sampling import Logprobs, Sampler, SamplingBatch, uses_history
from engines.scheduler import ScheduledBatch
from engines.sequence import Sequence
from engines.step_clock import StepClock
from engines.tensor_parallel.driver import ShardedModel
from engines.transfer import to_device, to_host


@dataclass
class LaunchedStep:
    """A step whose device work is queued, and the host copies of what it samples, being made behind it:
    ``ModelRunner.wait`` reads them."""

    batch: ScheduledBatch
    rows: list[SampleRow]
    steps: list[int]  # tokens each row samples
    tokens: torch.Tensor | None = None  # [steps, rows] (None: the step samples nothing)
    logprobs: Logprobs | None = None  # of those tokens, [steps, rows, ...], when a row asked for them
    # Prompt tokens' log-probabilities the step computed, and whose: (sequence, first position, count) in order
    prompt_logprobs: Logprobs | None = None
    prompt_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)
    ready: torch.cuda.Event | None = None  # recorded after the copies (CUDA)


@dataclass
class StepResult:
    """What the host reads of a launched step: each row's tokens (one per decode step it ran) and, where asked,
    each token's (log-probability, top ids, top log-probabilities); the prompt spans' likewise, in span order."""

    tokens: list[list[int]]
    logprobs: list[list[tuple]] | None = None
    prompt_logprobs: list[tuple] | None = None


@dataclass
class SampleRow:
    """One token to sample: ``seq`` draws it from the logits of ``source``'s last computed token."""

    seq: Sequence
    source: Sequence


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    return sorted(set(sizes + [max_batch]))


class _DecodeGraphs:
    """CUDA graphs of decode steps, one per padded batch size, sharing one memory pool and input buffers."""

    def __init__(self, runner: "ModelRunner", max_batch: int, max_blocks: int, max_model_len: int) -> None:
        device = runner.device
        self.sizes = graph_batch_sizes(max_batch)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        paged = max_blocks > 0
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device) if paged else None
        self.seq_starts = None if paged else torch.zeros(n, dtype=torch.int32, device=device)
        self.block_size = runner.kv.block_size
        self.max_model_len = max_model_len
        # tensor parallel: the workers replay their graph of each replay's size too
        self.workers = runner.model if isinstance(runner.model, ShardedModel) else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for b in reversed(self.sizes):
            meta = self.metadata(b)
            # warm up outside the capture: Triton compiles, cuBLAS picks kernels, the decode-sized GEMM reserves its
            # counters (kernels.triton_ops.linear; that GEMM itself runs, and compiles, only in the captures)
            for _ in range(2):
                runner.model(self.input_ids[:b], self.positions[:b], runner.kv_cache, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = runner.model(self.input_ids[:b], self.positions[:b], runner.kv_cache, meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def metadata(self, b: int) -> AttentionMetadata:
        addressing = Addressing(
            None if self.block_tables is None else self.block_tables[:b],
            None if self.seq_starts is None else self.seq_starts[:b],
            self.block_size,
        )
        decode = DecodeBatch(self.seq_lens[:b], addressing, self.max_model_len)
        return AttentionMetadata(self.slot_mapping[:b], b, decode, None)

    def padded_size(self, batch: int) -> int | None:
        return next((b for b in self.sizes if b >= batch), None)

    def load(self, n: int, tables: np.ndarray | None, starts: np.ndarray | None) -> int:
        """Set the addressing of ``n`` sequences (and neutral padding rows) for the replays that follow."""
        b = self.padded_size(n)
        self.slot_mapping[n:b].fill_(-1)  # padding rows write nothing
        self.seq_lens[n:b].fill_(1)
        if tables is not None:
            self.block_tables[:n, : tables.shape[1]].copy_(to_device(tables, self.block_tables.device))
            self.block_tables[n:b, 0].fill_(0)
        else:
            self.seq_starts[:n].copy_(to_device(starts, self.seq_starts.device))
            self.seq_starts[n:b].fill_(0)
        return b

    def replay(self, n: int, b: int, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               seq_lens: torch.Tensor) -> torch.Tensor:
        """One decode step of ``n`` sequences from device tensors (a device-to-device copy each)."""
        self.input_ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slots)
        self.seq_lens[:n].copy_(seq_lens)
        if self.workers is not None:
            self.workers.replay_graph(b)
        self.graphs[b].replay()
        return self.outputs[b][:n]


PROMPT_ROWS = 256  # prompt positions scored at once: 256 x a 152k vocabulary is 156 MB of float32 logits


def _rows(lp: Logprobs, steps: int, rows: int) -> list[list[tuple]]:
    """[steps][rows] of (log-probability, top ids, top log-probabilities) from host tensors."""
    shape = (steps, rows, lp.top_ids.shape[-1])
    values = zip(lp.sampled.view(shape[:2]).tolist(), lp.top_ids.view(shape).tolist(), lp.top_values.view(shape).tolist())
    return [list(zip(*v)) for v in values]


def _only_active(sampling: SamplingBatch, active: np.ndarray) -> SamplingBatch:
    """``sampling`` for a step that some rows sit out (their sample is discarded): their generators are not
    drawn from, so a seeded sample's tokens do not depend on the steps other samples ran beside it."""
    generators = [g if a else None for g, a in zip(sampling.generators, active)]
    return sampling if generators == sampling.generators else dataclasses.replace(sampling, generators=generators)


def host_kv_cache(model: CausalLM | ShardedModel, num_slots: int) -> torch.Tensor:
    """The host cache swapped-out sequences go to: pinned when the model is on a GPU, so swaps are asynchronous copies."""
    cache = model.allocate_kv_cache(num_slots, device=torch.device("cpu"))
    return cache.pin_memory() if model.device.type == "cuda" else cache


def move_blocks(ops: CacheOps, kernels, kv_cache: torch.Tensor, host_cache: torch.Tensor | None, block_size: int,
                device: torch.device) -> None:
    """A step's swaps (blocks of ``block_size`` slots) and copies (of ``ops.copy_block_size``), in that order."""
    if ops.swap_out:
        src, dst = zip(*ops.swap_out)
        kernels.swap_blocks(kv_cache, host_cache, torch.tensor(src), torch.tensor(dst), block_size)
    if ops.swap_in:
        src, dst = zip(*ops.swap_in)
        kernels.swap_blocks(host_cache, kv_cache, torch.tensor(src), torch.tensor(dst), block_size)
    if ops.copies:
        src, dst = zip(*ops.copies)
        kernels.copy_blocks(kv_cache, to_device(np.asarray(src, dtype=np.int64), device),
                            to_device(np.asarray(dst, dtype=np.int64), device), ops.copy_block_size)


def _logprobs_to_host(lp: Logprobs | None) -> Logprobs | None:
    return None if lp is None else Logprobs(to_host(lp.sampled), to_host(lp.top_ids), to_host(lp.top_values))


class ModelRunner:
    def __init__(
        self,
        model: CausalLM | ShardedModel,
        kv: KVManager,
        *,
        num_slots: int,
        num_host_slots: int,
        max_model_len: int,
        use_cuda_graphs: bool,
        cuda_graph_max_batch: int,
        cuda_graph_max_tokens: int = 0,
        cuda_graph_token_step: int = 256,
        clock: StepClock | None = None,
        logprobs_mode: str = "raw",
        storage: KVStorage | None = None,
    ) -> None:
        self.model = model
        self.logprobs_mode = logprobs_mode
        self.clock = clock or StepClock(model.device, enabled=False)
        self.kv = kv
        self.device = model.device
        self.max_model_len = max_model_len
        self.storage = storage or KVStorage(model.allocate_kv_cache(num_slots))
        self.kv_cache = self.storage.tensor
        self.host_cache = host_kv_cache(model, num_host_slots) if num_host_slots else None
        self.sampler = Sampler()
        # The last launched step's samples on the device, and the index of each sequence's last one in them:
        # the next step reads tokens the host has not (asynchronous scheduling).
        self._last_sampled = torch.zeros(0, dtype=torch.long, device=self.device)
        self._last_index: dict[int, int] = {}
        self.graphs = self.pieces = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = _DecodeGraphs(self, cuda_graph_max_batch, kv.max_blocks_per_seq(max_model_len), max_model_len)
            if cuda_graph_max_tokens > 0 and isinstance(model, CausalLM):  # (a tensor-parallel model: not yet)
                self.pieces = PiecewiseGraphs(model, self.kv_cache, cuda_graph_max_tokens, cuda_graph_token_step,
                                              capture=True)

    # -- cache moves -------------------------------------------------------------------------
    def apply(self, ops: CacheOps) -> None:
        self.clock.lap("kv")
        self.storage.apply(ops.unmaps, ops.maps)
        self.clock.lap("map")
        self._mirror(ops)
        move_blocks(ops, self.model.ops, self.kv_cache, self.host_cache, self.kv.block_size, self.device)

    def map_ahead(self, ops: CacheOps) -> None:
        """Page maps and unmaps made while the device runs a step (the storage's own stream or thread)."""
        self._mirror(ops)
        self.storage.apply_async(ops.unmaps, ops.maps)

    def _mirror(self, ops: CacheOps) -> None:
        if isinstance(self.model, ShardedModel) and ops:
            self.model.cache_ops(ops, self.kv.block_size)  # the workers map and move their shards' pages alike

    # -- the step ----------------------------------------------------------------------------
    def _sampling_batch(self, rows: list[SampleRow]) -> SamplingBatch:
        params = [r.seq.request.sampling_params for r in rows]
        history = uses_history(params)  # token histories cost a copy of every output so far: only for penalties
        return SamplingBatch.build(
            params,
            [r.seq.generator for r in rows],
            [r.seq.token_ids[r.seq.num_prompt:] for r in rows] if history else None,
            [r.seq.request.prompt_token_ids for r in rows] if history else None,
            self.model.cfg.vocab_size,
            self.device,
        )

    @torch.no_grad()
    def launch(self, batch: ScheduledBatch, rows: list[SampleRow]) -> LaunchedStep:
        """Queue the batch's forward and sampling on the device; the host does not wait for them. Decodes
        whose last token is still on the device (``num_pending``) read it from the last step's samples."""
        clock = self.clock
        prompt: tuple[Logprobs | None, list] = (None, [])
        if not batch.prefills:
            sampled, logprobs, index = self._run_decodes(batch.decodes, batch.decode_steps, rows)
            steps = batch.decode_steps
        else:
            sampled, logprobs, index, prompt = self._run_mixed(batch, rows)
            steps = [1] * len(rows)
        clock.end()
        step = LaunchedStep(batch, rows, steps, None if sampled is None else to_host(sampled),
                            _logprobs_to_host(logprobs), _logprobs_to_host(prompt[0]), prompt[1])
        if self.device.type == "cuda" and (sampled is not None or prompt[0] is not None):
            step.ready = torch.cuda.Event()
            step.ready.record()
        if sampled is not None:
            self._last_sampled = sampled.view(-1)
            self._last_index = index
        clock.lap("launch")
        return step

    def wait(self, step: LaunchedStep) -> StepResult:
        """Read a launched step's tokens and log-probabilities: the one host sync."""
        if step.ready is not None:
            step.ready.synchronize()
        if isinstance(self.model, ShardedModel):
            self.model.check()  # a step a dead worker left half done yields no tokens
        result = StepResult([])
        if step.prompt_logprobs is not None:
            result.prompt_logprobs = _rows(step.prompt_logprobs, 1, len(step.prompt_logprobs.sampled))[0]
        if step.tokens is not None:
            tokens = step.tokens.view(-1, len(step.rows)).tolist()  # [steps, rows]
            result.tokens = [[tokens[j][i] for j in range(k)] for i, k in enumerate(step.steps)]
            if step.logprobs is not None:
                per_step = _rows(step.logprobs, len(tokens), len(step.rows))
                result.logprobs = [[per_step[j][i] for j in range(k)] for i, k in enumerate(step.steps)]
        self.clock.lap("sync")
        return result

    def _pending_ids(self, ids: np.ndarray, where: list[int], seqs: list[Sequence]) -> np.ndarray | None:
        """Gather indices that put the device-held last token of each of ``seqs`` at ``ids[where]``: index
        ``i < P`` reads the last step's i-th sample, ``P + j`` reads ``ids[j]``; None if nothing is pending."""
        if not where:
            return None
        p = self._last_sampled.numel()
        index = np.arange(p, p + len(ids), dtype=np.int64)
        index[where] = [self._last_index[s.seq_id] for s in seqs]
        return index

    def _ids_on_device(self, packed: torch.Tensor, gather: bool) -> torch.Tensor:
        """Row 0 of ``packed`` holds host-known ids, row 1 (if ``gather``) the gather indices of ``_pending_ids``."""
        if not gather:
            return packed[0]
        return torch.cat([self._last_sampled, packed[0]])[packed[1]]

    def _run_mixed(self, batch: ScheduledBatch, rows: list[SampleRow]
                   ) -> tuple[torch.Tensor | None, Logprobs | None, dict[int, int], tuple[Logprobs | None, list]]:
        """A step with prompt chunks (decodes first): one varlen forward without graphs, then sampling."""
        scheduled = [(s, 1) for s in batch.decodes] + batch.prefills
        if rows:  # which rows of the forward's output the samples read: known before it runs
            last = {}  # sequence -> row of its last token in the forward's output
            offset = 0
            for seq, n in scheduled:
                offset += n
                last[id(seq)] = offset - 1
            sources = sorted({last[id(r.source)] for r in rows})
            pick = {h: i for i, h in enumerate(sources)}
            gather = to_device(np.asarray(sources, dtype=np.int64), self.device)
            order = to_device(np.asarray([pick[last[id(r.source)]] for r in rows], dtype=np.int64), self.device)
            sampling = self._sampling_batch(rows)
        hidden = self._forward_eager(scheduled)
        prompt = self._score_prompts(hidden, scheduled)
        if not rows:
            return None, None, {}, prompt
        logits = self.model.compute_logits(hidden[gather], upcast=sampling.needs_float)[order]
        sampled = self.sampler(logits, sampling)
        logprobs = self._logprobs(logits, sampled, sampling)
        return sampled, logprobs, {r.seq.seq_id: i for i, r in enumerate(rows) if r.seq is r.source}, prompt

    def _score_prompts(self, hidden: torch.Tensor, scheduled: list[tuple[Sequence, int]]
                       ) -> tuple[Logprobs | None, list[tuple[Sequence, int, int]]]:
        """Log-probabilities of the prompt tokens this step's chunks predict, for the sequences that asked: the row
        of position p scores token p + 1 (the last prompt position's row samples instead). Raw logits, in slices of
        ``PROMPT_ROWS`` rows (a row of logits is a vocabulary of floats)."""
        spans, rows, offset = [], [], 0
        for seq, n in scheduled:
            if seq.request.sampling_params.prompt_logprobs is not None:
                lo = max(seq.num_computed, len(seq.prompt_logprobs))  # a recompute scores nothing twice
                hi = min(seq.num_computed + n, seq.num_prompt - 1)
                if hi > lo:
                    spans.append((seq, lo, hi - lo))
                    rows.append(np.arange(offset + lo - seq.num_computed, offset + hi - seq.num_computed))
            offset += n
        if not spans:
            return None, []
        k = max(s.request.sampling_params.prompt_logprobs for s, _, _ in spans)
        targets = np.concatenate([s.token_ids[lo + 1 : lo + 1 + c] for s, lo, c in spans]).astype(np.int64)
        index = to_device(np.stack([np.concatenate(rows), targets]), self.device)
        parts = []
        for i in range(0, index.shape[1], PROMPT_ROWS):
            lp = torch.log_softmax(self.model.compute_logits(hidden[index[0, i : i + PROMPT_ROWS]]), dim=-1)
            top = lp.topk(k, dim=-1)
            parts.append((lp.gather(1, index[1, i : i + PROMPT_ROWS, None]).squeeze(1), top.indices, top.values))
        return Logprobs(*(torch.cat(t) for t in zip(*parts))), spans

    def _logprobs(self, logits: torch.Tensor, sampled: torch.Tensor, sampling: SamplingBatch) -> Logprobs | None:
        if sampling.num_logprobs < 0:  # nobody asked: nothing computed
            return None
        return self.sampler.logprobs(logits, sampled, sampling, self.logprobs_mode)

    def _run_decodes(self, seqs: list[Sequence], steps: list[int], rows: list[SampleRow]
                     ) -> tuple[torch.Tensor, Logprobs | None, dict[int, int]]:
        """Decode ``steps[i]`` tokens of each sequence, feeding each step's samples to the next on the
        device (several steps: vLLM's multi-step scheduling). Returns the samples [steps, B] and where each
        sequence's last one is in them, flattened."""
        clock = self.clock
        n, k = len(seqs), max(steps)
        # A sequence with fewer steps than the batch repeats its last position without writing
        # (slot -1), so it never reads past what it was allocated.
        inner = np.minimum(np.arange(k)[:, None], np.asarray(steps) - 1)
        positions = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=n) + inner
        active = np.arange(k)[:, None] < np.asarray(steps)
        slots = np.where(active, self.kv.decode_slots(seqs, positions), -1)
        tables, starts = self.kv.addressing(seqs)
        sampling = self._sampling_batch(rows)
        where = [i for i, s in enumerate(seqs) if s.num_pending]
        host_ids = np.fromiter((0 if s.num_pending else s.token_ids[-1] for s in seqs), dtype=np.int64, count=n)
        index = self._pending_ids(host_ids, where, [seqs[i] for i in where])
        graphs = self.graphs if self.graphs is not None and self.graphs.padded_size(n) is not None else None
        if graphs is not None:
            b = graphs.load(n, tables, starts)
            lead = [host_ids] if index is None else [host_ids, index]
            dev = to_device(np.concatenate([np.stack(lead), positions, slots, positions + 1]), self.device)
            ids = self._ids_on_device(dev, index is not None)
            dev = dev[len(lead):].view(3, k, n)
        else:
            packed = to_device(np.stack([host_ids] if index is None else [host_ids, index]), self.device)
            ids = self._ids_on_device(packed, index is not None)
        sampled, logprobs = [], []
        clock.lap("prepare")
        for j in range(k):
            if graphs is not None:
                if not j:
                    clock.begin()
                hidden = graphs.replay(n, b, ids, dev[0, j], dev[1, j], dev[2, j].int())
            else:
                meta = build_metadata([StepSequence(int(p), 1) for p in positions[j]], slots[j],
                                      block_tables=tables, seq_starts=starts, block_size=self.kv.block_size,
                                      device=self.device)
                position = to_device(positions[j], self.device)
                clock.lap("prepare")
                if not j:  # the device span starts with the first forward, after its inputs are built
                    clock.begin()
                hidden = self._forward(ids, position, meta)
            logits = self.model.compute_logits(hidden, upcast=sampling.needs_float)
            step_sampling = sampling if j < min(steps) else _only_active(sampling, active[j])
            ids = self.sampler(logits, step_sampling)
            logprobs.append(self._logprobs(logits, ids, step_sampling))
            clock.lap("launch")
            sampled.append(ids)
        last = {s.seq_id: (steps[i] - 1) * n + i for i, s in enumerate(seqs)}
        if logprobs[0] is None:
            return torch.stack(sampled), None, last
        return torch.stack(sampled), Logprobs(*(torch.stack(t) for t in zip(
            *((lp.sampled, lp.top_ids, lp.top_values) for lp in logprobs)))), last

    def _forward_eager(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One varlen forward of a step's decodes and prompt chunks; a decode's token may still be on the device."""
        seqs = [s for s, _ in scheduled]
        ids = np.concatenate([np.asarray(s.token_ids[s.num_computed : s.num_computed + n] if not s.num_pending
                                         else [0], dtype=np.int64) for s, n in scheduled])
        where = [i for i, s in enumerate(seqs) if s.num_pending]  # pending ones are decodes: row i is token i
        index = self._pending_ids(ids, where, [seqs[i] for i in where])
        positions = np.concatenate([np.arange(s.num_computed, s.num_computed + n) for s, n in scheduled])
        slots = np.concatenate([self.kv.slot_mapping(s, s.num_computed, s.num_computed + n) for s, n in scheduled])
        tables, starts = self.kv.addressing(seqs)
        meta = build_metadata(
            [StepSequence(s.num_computed, n) for s, n in scheduled], slots,
            block_tables=tables, seq_starts=starts, block_size=self.kv.block_size, device=self.device,
        )
        packed = to_device(np.stack([ids, positions] if index is None else [ids, index, positions]), self.device)
        ids_d = self._ids_on_device(packed, index is not None)
        self.clock.lap("prepare")
        self.clock.begin()
        return self._forward(ids_d, packed[-1], meta)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward of a step no whole-step graph holds: piecewise graphs if it fits them, else eager."""
        if self.pieces is not None and self.pieces.padded_size(ids.shape[0]) is not None:
            return self.pieces.forward(ids, positions, meta)
        return self.model(ids, positions, self.kv_cache, meta)
