"""One sequence: a sample of a request, with its tokens and how much of it the cache holds."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from engines.detokenizer import SampleStream
from engines.request import Request

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted by recompute (its cache was dropped)
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swapping its blocks to CPU
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n samples
    stream: SampleStream
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)  # prompt + generated, as far as the host has read them
    num_computed: int = 0  # tokens whose K/V is in the cache (or queued on the device to be)
    # Tokens sampled on the device that the host has not read yet (asynchronous scheduling:
    # the next step is scheduled before this one's tokens come back). They count in every
    # length below; the runner feeds them to the model from the device.
    num_pending: int = 0
    # Log-probabilities of prompt tokens 1.. computed so far (SamplingParams.prompt_logprobs), kept across a
    # recompute (its positions are not scored twice); samples forked from this one report this list too.
    prompt_logprobs: list = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_forks: int = 0  # samples to fork from this one once its prompt is done (n > 1)
    first_scheduled_time: float | None = None
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at admission
    seq_id: int = field(default_factory=lambda: next(_ids))
    # plain attributes, not properties: the engine reads them for every sequence every step
    num_prompt: int = field(init=False)
    key: tuple[str, int] = field(init=False)  # (request id, sample index)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
        self.num_prompt = self.request.num_prompt_tokens
        self.key = (self.request.request_id, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing from the cache: a one-token step."""
        n = self.num_tokens
        return self.num_computed > 0 and n - self.num_computed == 1 and n > self.num_prompt

    @property
    def is_done_pending(self) -> bool:
        """Its last possible token is sampled but not read yet: it finishes when that token arrives."""
        return self.num_pending > 0 and self.num_tokens >= self.final_len_bound

    @property
    def final_len_bound(self) -> int:
        """The most tokens this sequence can ever hold (prompt + max_tokens, within the context)."""
        return min(self.num_prompt + self.request.sampling_params.max_tokens, self.stream.max_model_len)
