"""``hf``: transformers' ``model.generate`` behind the Engine contract.

Static, left-padded batches (``batch_size`` 1 is one request at a time), run on a worker
thread so each decoding step's tokens stream out as they are made; a batch admits no newcomer
until its last row finishes, which is what static batching costs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from engines.base import Engine, KVStats
from engines.hf_common import (
    POLL_SECONDS,
    Row,
    error_output,
    load_hf_model,
    require_weight_files,
)
from engines.model.loader import resolve_device
from engines.request import Request, RequestOutput, SamplingParams


def _batch_key(p: SamplingParams) -> tuple:
    """Rows of one generate() call must share these; the rest is handled per row."""
    return (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.seed)


class _PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI-style presence/frequency penalties on generated tokens (generate has none)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@dataclass
class _Batch:
    rows: list[Row]
    events: "queue.Queue[list[RequestOutput] | BaseException | None]" = field(default_factory=queue.Queue)
    padded_len: int = 0  # cache length every row occupies right now
    num_prompt_tokens: int = 0
    num_generated: int = 0  # tokens the rows have made so far (counted as they come, for kv_stats)
    done: threading.Event = field(default_factory=threading.Event)  # set when generate() has returned


class _StreamRows(StoppingCriteria):
    """Called by generate after every step: timestamps the new tokens, feeds our stop rules, streams outputs."""

    def __init__(self, batch: _Batch, prompt_len: int, first_scheduled: float) -> None:
        self.batch, self.prompt_len, self.first_scheduled = batch, prompt_len, first_scheduled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()  # waits for the device: the tokens exist only now
        now = time.perf_counter()
        self.batch.padded_len = input_ids.shape[1]
        outputs = []
        for row, token in zip(self.batch.rows, new):
            if row.stream.finished or row.aborted:
                continue
            self.batch.num_generated += 1
            text = row.stream.append(token)
            outputs.append(RequestOutput(
                request_id=row.request.request_id, index=row.index, new_token_ids=[token], token_times=[now],
                text=text, finished=row.stream.finished, finish_reason=row.stream.finish_reason,
                stop_reason=row.stream.stop_reason, num_prompt_tokens=row.request.num_prompt_tokens,
                first_scheduled_time=self.first_scheduled if len(row.stream.token_ids) == 1 else None,
            ))
        self.batch.events.put(outputs)
        done = [row.stream.finished or row.aborted for row in self.batch.rows]
        return torch.tensor(done, device=input_ids.device)


class HFEngine(Engine):
    name = "hf"
    kv_breakdown = False  # a dynamic cache per batch: no capacity to split

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 1,
        dtype: str = "auto",
        device: str = "auto",
        attn_implementation: str = "sdpa",
        max_model_len: int | None = None,
    ) -> None:
        super().__init__(model_dir, max_model_len)
        require_weight_files(self.name, self.model_config)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = load_hf_model(self.model_dir, dtype, self.device, attn_implementation, self.model_config)
        # generate() fills an unset eos_token_id from the model's generation config and would then end
        # rows (and pad them) on its own; our stop rules (SampleStream) are the only ones.
        self.model.generation_config.eos_token_id = None
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.waiting: deque[Request] = deque()
        self.batch: _Batch | None = None
        self._jobs: queue.Queue[_Batch | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def add_request(self, request: Request) -> None:
        self.check_request(request)
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    def abort(self, request_id: str) -> None:
        for r in list(self.waiting):
            if r.request_id == request_id:
                self.waiting.remove(r)
                for i in range(r.sampling_params.n):
                    self.report_aborted(request_id, i, r.num_prompt_tokens)
        if self.batch is not None:
            for row in self.batch.rows:
                if row.request.request_id == request_id and not row.stream.finished and not row.aborted:
                    row.aborted = True
                    self.report_aborted(request_id, row.index, row.request.num_prompt_tokens)

    def _step(self) -> list[RequestOutput]:
        if self.batch is None:
            if not self.waiting:
                return []
            self.batch = self._start_batch()
        try:
            event = self.batch.events.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return []
        outputs: list[RequestOutput] = []
        while True:
            if event is None:  # generate() returned
                self.batch = None
                return outputs
            if isinstance(event, BaseException):
                rows, self.batch = self.batch.rows, None
                return outputs + [error_output(r, event) for r in rows if not (r.stream.finished or r.aborted)]
            outputs.extend(o for o in event if not self._row_aborted(o))
            try:
                event = self.batch.events.get_nowait()
            except queue.Empty:
                return outputs

    def _row_aborted(self, out: RequestOutput) -> bool:
        return any(r.aborted and r.request.request_id == out.request_id and r.index == out.index for r in self.batch.rows)

    def _take_batch(self) -> list[Row]:
        """FCFS: the head request and the next waiting ones that can share its generate() call."""
        head = self.waiting[0]
        key = _batch_key(head.sampling_params)
        chosen: list[Request] = []
        rows = 0
        for r in list(self.waiting):
            if _batch_key(r.sampling_params) != key or rows + r.sampling_params.n > max(self.batch_size, head.sampling_params.n):
                continue
            chosen.append(r)
            rows += r.sampling_params.n
            self.waiting.remove(r)
            if rows >= self.batch_size:
                break
        return [Row(r, i, self.new_stream(r)) for r in chosen for i in range(r.sampling_params.n)]

    def _start_batch(self) -> _Batch:
        """Hand a batch to the one worker thread (a new thread per batch would start a new OpenMP
        team each time, which stalls for tenths of a second on a busy CPU)."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, daemon=True, name="hf-generate")
            self._worker.start()
        batch = _Batch(self._take_batch())
        batch.padded_len = max(r.request.num_prompt_tokens for r in batch.rows)  # the prompts' cache, before a token
        batch.num_prompt_tokens = sum(r.request.num_prompt_tokens for r in batch.rows)
        self._jobs.put(batch)
        return batch

    @torch.no_grad()
    def _work(self) -> None:
        while (batch := self._jobs.get()) is not None:
            try:
                self._generate(batch)
            except BaseException as e:  # reported to the caller of step(), never lost in the thread
                batch.events.put(e)
            else:
                batch.events.put(None)
            batch.done.set()

    def _generate(self, batch: _Batch) -> None:
        prompts = [row.request.prompt_token_ids for row in batch.rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generate wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        params = batch.rows[0].request.sampling_params
        max_new = max(min(r.request.sampling_params.max_tokens, self.max_model_len - len(p)) for r, p in zip(batch.rows, prompts))
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=not params.greedy, temperature=params.temperature or None,
            top_k=params.top_k or None, top_p=params.top_p if params.top_p < 1 else None,
            min_p=params.min_p or None, repetition_penalty=params.repetition_penalty, eos_token_id=None,
            pad_token_id=self.pad_id,
        )
        processors = LogitsProcessorList()
        if params.presence_penalty or params.frequency_penalty:
            processors.append(_PresenceFrequencyPenalty(width, params.presence_penalty, params.frequency_penalty))
        if params.seed is not None:
            torch.manual_seed(params.seed)
        criteria = StoppingCriteriaList([_StreamRows(batch, width, time.perf_counter())])
        self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=config,
            logits_processor=processors, stopping_criteria=criteria,
        )

    def kv_stats(self) -> KVStats:
        """The DynamicCache of a static batch: every row holds the padded length until the batch ends.
        There is no fixed capacity to split, so no breakdown; the counts are kept as the batch runs."""
        batch = self.batch
        if batch is None:
            return KVStats(0, 0, 0, 0, 0, num_waiting=len(self.waiting), breakdown=self.kv_breakdown)
        rows = len(batch.rows)
        return KVStats(capacity=0, stored=batch.num_prompt_tokens + batch.num_generated, allocated=batch.padded_len * rows,
                       free=0, largest_free_extent=0, num_running=rows, num_waiting=len(self.waiting), breakdown=self.kv_breakdown)

    def close(self) -> None:
        if self.batch is not None:
            for row in self.batch.rows:
                row.aborted = True
            self.batch.done.wait()
            self.batch = None
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
