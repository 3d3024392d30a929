"""What a client asks for and what an engine answers: the data of the Engine contract."""

from __future__ import annotations

import enum
import math
import time
from itertools import repeat
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request that no engine can serve as given; the message names the field."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached (or the model's context)
    ABORT = "abort"  # the client aborted
    ERROR = "error"  # the engine could not serve it (e.g. it can never fit in KV memory)


MAX_LOGPROBS = 20  # the most top log-probabilities a token may ask for (OpenAI's and vLLM's default limit)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability, and the most likely tokens at its position (id, log-probability), best
    first, as many as the request asked for."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with vLLM's names and defaults (temperature 0 is greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only (benchmarks skip the text); stop strings still work
    # Log-probabilities of each sampled token and of the ``logprobs`` most likely tokens at its position
    # (0: the sampled token's alone; None: none, at no cost). engine.logprobs_mode says of which logits.
    logprobs: int | None = None
    # Likewise for every prompt token after the first (an evaluation's score of a text; OpenAI's echo). A request
    # asking for them bypasses the prefix cache: a cached position computes no logits.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (JSON, Hydra) and a single stop string, store tuples so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self.validate()

    def validate(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (_finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and 0 <= self.top_k < 2**31, f"top_k must be -1, 0 or a positive integer below 2**31, got {self.top_k!r}"),
            (_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"),
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(0 <= t < 2**63 for t in self.stop_token_ids), "stop_token_ids must be non-negative 64-bit integers"),
            (self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63),
             f"seed must be a 64-bit integer, got {self.seed!r}"),
            (_top_count(self.logprobs), f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"),
            (_top_count(self.prompt_logprobs),
             f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _top_count(k: object) -> bool:
    return k is None or (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= MAX_LOGPROBS)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Request:
    """One generation request; ``arrival_time`` is on the ``time.perf_counter()`` clock."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.perf_counter)
    prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise RequestError(f"request {self.request_id!r}: the prompt is empty")
        ids = self.prompt_token_ids  # map and min loop in C: a long prompt is checked at every add
        if not all(map(isinstance, ids, repeat(int))) or min(ids) < 0:
            raise RequestError(f"request {self.request_id!r}: prompt token ids must be non-negative integers")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def check_fits(self, max_model_len: int, vocab_size: int | None = None) -> None:
        """Raise if the prompt can never be served by a model with this context and vocabulary."""
        if self.num_prompt_tokens >= max_model_len:
            raise RequestError(
                f"request {self.request_id!r}: the prompt has {self.num_prompt_tokens} tokens, which leaves no room "
                f"to generate within the model's context of {max_model_len} tokens"
            )
        if vocab_size is not None and max(self.prompt_token_ids) >= vocab_size:
            raise RequestError(
                f"request {self.request_id!r}: token id {max(self.prompt_token_ids)} is outside the vocabulary of {vocab_size}"
            )


@dataclass
class RequestOutput:
    """What one step produced for one sample (``index`` < n) of one request.

    ``token_times`` holds the ``perf_counter`` time each new token became available;
    ``text`` is the newly detokenized text (held back while it may still be a stop string).
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    token_times: list[float]
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    error: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    # With a sample's first tokens, when asked: one per prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """This output and the next one of the same sample as one (a consumer that fell behind reads both at once)."""
        return RequestOutput(
            request_id=self.request_id, index=self.index, new_token_ids=self.new_token_ids + later.new_token_ids,
            token_times=self.token_times + later.token_times, text=self.text + later.text,
            finished=later.finished, finish_reason=later.finish_reason, num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens or later.num_cached_tokens,
            first_scheduled_time=self.first_scheduled_time if self.first_scheduled_time is not None
            else later.first_scheduled_time,
            error=later.error, stop_reason=later.stop_reason,
            logprobs=None if self.logprobs is None and later.logprobs is None
            else (self.logprobs or []) + (later.logprobs or []),
            prompt_logprobs=self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
        )
