"""The Engine contract: what the harness and the server may ask of every engine.

``add_request`` queues a request, ``step`` does one unit of work and returns the new
tokens of every sample that advanced (each with its time), ``abort`` drops a request and
frees its memory at once, ``kv_stats`` is a snapshot of KV memory in token slots.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from engines.detokenizer import SampleStream, load_tokenizer
from engines.kv.accounting import KVLedger, KVLog
from engines.model.config import ModelConfig
from engines.request import FinishReason, Request, RequestError, RequestOutput


@dataclass
class KVStats:
    """KV memory at one instant, in token slots of the capacity C (docs/methodology.md).

    Every field is a counter the engine keeps as memory changes, so a snapshot costs O(1)
    whatever the number of sequences or cached blocks. ``external``: free slots that cannot
    serve the demand waiting at the head of the queue (0 for paging, 0 when nothing waits).
    ``breakdown`` is False for engines that cannot say which slots hold token states.
    """

    capacity: int
    stored: int  # slots holding a live sequence's K/V (token states)
    allocated: int  # slots owned by live sequences
    free: int
    largest_free_extent: int  # the largest allocation that could succeed now
    external: int = 0
    cached: int = 0  # free slots still holding a reusable prefix (paged prefix cache)
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0  # cumulative
    num_swapped_out: int = 0  # cumulative sequences swapped to CPU
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative prompt tokens found cached
    breakdown: bool = True


class Engine(abc.ABC):
    name: ClassVar[str]
    # Our engines sample KV memory inside ``_step``, after the step's admissions; the others
    # are sampled by ``step`` once ``_step`` returns (their admissions happen out of sight).
    samples_kv_itself: ClassVar[bool] = False
    kv_breakdown: ClassVar[bool] = True  # False: it cannot say which of its slots hold token states
    supports_logprobs: ClassVar[bool] = False  # computes SamplingParams.logprobs and prompt_logprobs

    def __init__(self, model_dir: str | Path, max_model_len: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        limit = self.model_config.max_context
        if max_model_len is not None and max_model_len > limit:
            raise RequestError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
        self.max_model_len = max_model_len or limit
        self._aborted: list[RequestOutput] = []
        self.ledger = KVLedger()

    @classmethod
    def from_config(cls, model_dir: str | Path, cfg) -> "Engine":
        """Build from the engine's config dataclass (engines.config): its fields are the keyword arguments."""
        return cls(model_dir, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"})

    # -- the contract -------------------------------------------------------------------------
    @abc.abstractmethod
    def add_request(self, request: Request) -> None: ...

    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        if not self.samples_kv_itself:
            self.ledger.sample(time.perf_counter(), self.kv_stats() if self.ledger.record else None)
        if self._aborted:
            outputs = self._aborted + outputs
            self._aborted = []
        return outputs

    @abc.abstractmethod
    def _step(self) -> list[RequestOutput]: ...

    @abc.abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def has_unfinished(self) -> bool: ...

    @abc.abstractmethod
    def kv_stats(self) -> KVStats: ...

    def kv_log(self) -> KVLog:
        """KV memory after every step since the last call (and every change of a sequence's
        allocation, for engines with a breakdown); the harness drains it before and after a run."""
        log = self.ledger.drain()
        log.breakdown = self.kv_breakdown
        return log

    def close(self) -> None:
        """Release the device memory and threads the engine holds."""

    # -- shared helpers -----------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        request.check_fits(self.max_model_len, self.model_config.vocab_size)
        p = request.sampling_params
        if not self.supports_logprobs and (p.logprobs is not None or p.prompt_logprobs is not None):
            raise RequestError(f"request {request.request_id!r} asks for logprobs, which engine {self.name} does not "
                               "compute (ours do: contiguous, paged)")

    def new_stream(self, request: Request) -> SampleStream:
        return SampleStream(
            tokenizer=self.tokenizer,
            params=request.sampling_params,
            prompt_len=request.num_prompt_tokens,
            eos_token_ids=self.model_config.eos_token_ids,
            max_model_len=self.max_model_len,
        )

    def report_aborted(self, request_id: str, index: int, num_prompt_tokens: int) -> None:
        """Queue the final ABORT output of a sample, returned by the next ``step``."""
        self._aborted.append(RequestOutput(
            request_id=request_id, index=index, new_token_ids=[], token_times=[], finished=True,
            finish_reason=FinishReason.ABORT, num_prompt_tokens=num_prompt_tokens,
        ))

    def generate(self, requests: list[Request]) -> dict[str, list[list[int]]]:
        """Run requests to completion offline: request id -> token ids of each sample."""
        results: dict[str, list[list[int]]] = {}
        for r in requests:
            self.add_request(r)
            results[r.request_id] = [[] for _ in range(r.sampling_params.n)]
        while self.has_unfinished():
            for out in self.step():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                results[out.request_id][out.index].extend(out.new_token_ids)
        return results
