"""Batched sampling: each row of a logits batch follows its own request's SamplingParams.

Order, as in vLLM: repetition/presence/frequency penalties, then greedy rows take the
argmax; the other rows are divided by their temperature, cut by top-k, top-p and min-p,
and sampled with the exponential-race trick (argmax of p / q, q ~ Exp(1)), which lets a
seeded row draw its noise from its own generator while the rest share one draw. Work a
batch does not need (sorting for top-p, counting for penalties) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.request import SamplingParams
from engines.transfer import to_device


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a request seeded with ``seed`` (n > 1 samples differ)."""
    return seed if index == 0 else (seed * 1_000_003 + index) % (2**63)


def uses_history(params: list[SamplingParams]) -> bool:
    """Whether sampling these rows reads their token histories (a repetition, presence or frequency penalty)."""
    return any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (None where the batch does not need them:
    an all-greedy batch without penalties copies nothing to the device)."""

    temperature: torch.Tensor | None  # [B] float32; 0 = greedy
    top_k: torch.Tensor | None  # [B] int64; 0 = off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    presence: torch.Tensor | None  # [B] float32
    frequency: torch.Tensor | None  # [B] float32
    repetition: torch.Tensor | None  # [B] float32
    output_tokens: torch.Tensor | None  # [B, L] int64 padded with vocab_size; only when a penalty is on
    prompt_tokens: torch.Tensor | None  # [B, P] int64 padded with vocab_size; only for repetition penalty
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    use_penalties: bool
    use_repetition: bool
    max_top_k: int = 0  # the most logits any row keeps under top-k, 0: all (known on the host: no sync to find it)
    num_logprobs: int = -1  # the most top log-probabilities a row asked for; -1: no row asked for logprobs

    @property
    def needs_float(self) -> bool:
        """Whether the logits must be float32: anything but a plain argmax (temperature, cuts, penalties, logprobs)."""
        return not self.all_greedy or self.use_penalties or self.num_logprobs >= 0

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        output_ids: list[list[int]] | None,
        prompt_ids: list[list[int]] | None,
        vocab_size: int,
        device: torch.device,
    ) -> "SamplingBatch":
        """``output_ids``/``prompt_ids``: each row's tokens so far, needed (and read) only when ``uses_history``."""
        use_penalties = uses_history(params)
        use_repetition = any(p.repetition_penalty != 1.0 for p in params)
        all_greedy = all(p.greedy for p in params)
        columns = [None] * 7
        if use_penalties or not all_greedy:  # every column in one copy (top_k is exact in float32 below 2**24)
            table = np.array([(p.temperature, p.top_k, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
                               p.repetition_penalty) for p in params], dtype=np.float32)
            columns = list(to_device(table.T, device))
            columns[1] = columns[1].long()
        temperature, top_k, top_p, min_p, presence, frequency, repetition = columns
        return cls(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            presence=presence, frequency=frequency, repetition=repetition,
            output_tokens=_padded(output_ids, vocab_size, device) if use_penalties else None,
            prompt_tokens=_padded(prompt_ids, vocab_size, device) if use_repetition else None,
            generators=generators,
            all_greedy=all_greedy,
            any_greedy=any(p.greedy for p in params),
            use_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            use_penalties=use_penalties,
            use_repetition=use_repetition,
            max_top_k=0 if any(p.top_k <= 0 for p in params) else max(p.top_k for p in params),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return to_device(out, device)


def _token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.float32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    counts = _token_counts(batch.output_tokens, vocab)
    if batch.use_repetition:
        seen = (counts > 0) | (_token_counts(batch.prompt_tokens, vocab) > 0)
        rep = batch.repetition.unsqueeze(1)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency.unsqueeze(1) * counts
    return logits - batch.presence.unsqueeze(1) * (counts > 0).float()


def _mask_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    k = torch.where(top_k > 0, top_k, logits.shape[1]).clamp(max=logits.shape[1])
    width = min(max_top_k, logits.shape[1]) if max_top_k else logits.shape[1]
    kth = torch.topk(logits, width, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _mask_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already reach top_p (the first always stays)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _mask_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


def _exponential_noise(shape: torch.Size, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    q = torch.empty(shape, device=device).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            q[row].exponential_(generator=gen)
    return q


def _scaled(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits divided by each row's temperature (greedy rows as they are)."""
    return logits / torch.where(batch.temperature == 0, 1.0, batch.temperature).unsqueeze(1)


@dataclass
class Logprobs:
    """Per row of a step's samples, on the device: the sampled token's log-probability [B] and the ``k`` most
    likely tokens' ids and log-probabilities [B, k] (k: the most any row asked for)."""

    sampled: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor


class Sampler:
    """Stateless; the per-request state (generators, token history) travels in ``SamplingBatch``."""

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch, mode: str) -> Logprobs:
        """Log-probabilities of ``tokens`` and the top ``batch.num_logprobs`` under ``logits`` [B, V] float32: as
        they are (``raw``), or after penalties and temperature (``processed``). Computed only when a row asks."""
        if mode == "processed":
            if batch.use_penalties:
                logits = apply_penalties(logits, batch)
            if not batch.all_greedy:
                logits = _scaled(logits, batch)
        lp = torch.log_softmax(logits, dim=-1)
        top = lp.topk(batch.num_logprobs, dim=-1) if batch.num_logprobs else None
        empty = lp[:, :0]
        return Logprobs(lp.gather(1, tokens.unsqueeze(1)).squeeze(1),
                        top.indices if top is not None else empty.long(), top.values if top is not None else empty)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [B, V] (float32 where ``batch.needs_float``; else any dtype: an argmax) -> token ids [B] int64."""
        if batch.use_penalties:
            logits = apply_penalties(logits, batch)
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        is_greedy = batch.temperature == 0
        logits = _scaled(logits, batch)
        if batch.use_top_k:
            logits = _mask_top_k(logits, batch.top_k, batch.max_top_k)
        if batch.use_top_p:
            logits = _mask_top_p(logits, batch.top_p)
        if batch.use_min_p:
            logits = _mask_min_p(logits, batch.min_p)
        probs = logits.softmax(dim=-1)
        sampled = (probs / _exponential_noise(probs.shape, batch.generators, probs.device)).argmax(dim=-1)
        return torch.where(is_greedy, greedy, sampled) if batch.any_greedy else sampled
