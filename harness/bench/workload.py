"""Requests of a workload: prompts as token ids and sampling params, deterministic given a seed.

Synthetic prompts are random token ids from the tokenizer's regular vocabulary (special
tokens would end or reshape a sequence), with lengths drawn from a fixed, uniform or
lognormal distribution; real prompts come from a ShareGPT-format JSON or a JSONL file and
are tokenized with the model's own tokenizer. Lengths are exact: requests use
``ignore_eos`` by default, so ``max_tokens`` is the true output length (which the
contiguous engine's ``oracle`` reservation reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engines.request import SamplingParams
from harness.bench.schema import DatasetSpec, LengthDist, WorkloadSpec
from harness.common.engine import regular_token_ids
from harness.common.errors import UserError


@dataclass(frozen=True)
class PlannedRequest:
    """A request before it is sent: the runner stamps its arrival time when it is due."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams

    @property
    def total_len(self) -> int:
        return len(self.prompt_token_ids) + self.sampling_params.max_tokens


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[clip(exp(mu + sigma Z), low, high)] for standard normal Z, in closed form."""
    a, b = math.log(low), math.log(high)
    inside = math.exp(mu + sigma**2 / 2) * (_phi((b - mu - sigma**2) / sigma) - _phi((a - mu - sigma**2) / sigma))
    return low * _phi((a - mu) / sigma) + high * (1 - _phi((b - mu) / sigma)) + inside


def lognormal_mu(mean: float, sigma: float, low: float, high: float) -> float:
    """The log-space location whose clipped lognormal has ``mean`` (bisection: the mean grows with mu)."""
    lo, hi = math.log(low) - 10 * sigma, math.log(high) + 10 * sigma
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_lognormal_mean(mid, sigma, low, high) < mean else (lo, mid)
    return (lo + hi) / 2


def draw_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist.dist == "fixed":
        return np.full(n, dist.value, dtype=np.int64)
    if dist.dist == "uniform":
        return rng.integers(dist.low, dist.high + 1, size=n)
    mu = lognormal_mu(dist.mean, dist.sigma, dist.low, dist.high)
    return np.clip(np.rint(rng.lognormal(mu, dist.sigma, size=n)), dist.low, dist.high).astype(np.int64)


def _load_sharegpt(path: Path, tokenizer: Tokenizer, spec: DatasetSpec) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) of each conversation's first human turn and its reply, pruned as vLLM's benchmark."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"workload.dataset.path: {path} is not a ShareGPT JSON file ({e})") from e
    if not isinstance(data, list):
        raise UserError(f"workload.dataset.path: {path} must hold a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not turns or len(turns) < 2:
            continue
        prompt = tokenizer.encode(str(turns[0].get("value", ""))).ids
        output_len = len(tokenizer.encode(str(turns[1].get("value", ""))).ids)
        if len(prompt) < 4 or output_len < 4 or len(prompt) > spec.max_prompt_len or len(prompt) + output_len > spec.max_total_len:
            continue
        pairs.append((prompt, output_len))
    return pairs


def _load_jsonl(path: Path, tokenizer: Tokenizer) -> list[tuple[list[int], int | None]]:
    """One prompt a line: a JSON string, or an object with "prompt" (and optionally "output_len")."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"workload.dataset.path: {path} line {number} is not JSON ({e})") from e
        prompt = item if isinstance(item, str) else item.get("prompt") if isinstance(item, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"workload.dataset.path: {path} line {number} has no \"prompt\" string")
        output_len = item.get("output_len") if isinstance(item, dict) else None
        pairs.append((tokenizer.encode(prompt).ids, None if output_len is None else int(output_len)))
    return pairs


def load_dataset(spec: DatasetSpec, tokenizer: Tokenizer) -> list[tuple[list[int], int | None]]:
    path = Path(spec.path)
    fmt = spec.format if spec.format != "auto" else ("jsonl" if path.suffix == ".jsonl" else "sharegpt")
    return _load_sharegpt(path, tokenizer, spec) if fmt == "sharegpt" else _load_jsonl(path, tokenizer)


def mean_output_tokens(spec: WorkloadSpec, tokenizer: Tokenizer) -> float:
    """The expected output length of a request: the distribution's (lognormal: after clipping), or a dataset's mean
    over its usable prompts (the drawn distribution's where a prompt has no reply length)."""
    d = spec.output
    drawn = {"fixed": float(d.value), "uniform": (d.low + d.high) / 2, "lognormal": float(d.mean)}[d.dist]
    if spec.dataset.path is None:
        return drawn
    lengths = [length for _, length in load_dataset(spec.dataset, tokenizer)]
    return float(np.mean([drawn if length is None else length for length in lengths])) if lengths else drawn


def build_workload(spec: WorkloadSpec, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, seed: int) -> list[PlannedRequest]:
    """The workload's requests in sending order; every one fits ``max_model_len``."""
    # Independent streams, so that changing one aspect (say, the prefix) leaves the others as they were.
    prompts_rng, lengths_rng, prefix_rng, order_rng = (np.random.default_rng([seed, stream]) for stream in range(4))
    n = spec.num_requests
    vocab = regular_token_ids(tokenizer, vocab_size)
    prefixes = [vocab[prefix_rng.integers(0, len(vocab), spec.prefix.length)].tolist() for _ in range(spec.prefix.num_groups)]
    drawn_outputs = draw_lengths(spec.output, n, lengths_rng)
    if spec.dataset.path is not None:
        pairs = load_dataset(spec.dataset, tokenizer)
        if len(pairs) < n:
            raise UserError(f"workload.dataset.path: {spec.dataset.path} has {len(pairs)} usable prompts, "
                            f"workload.num_requests is {n}")
        chosen = order_rng.permutation(len(pairs))[:n]
        bodies = [pairs[i][0] for i in chosen]
        outputs = [pairs[i][1] or int(drawn_outputs[k]) for k, i in enumerate(chosen)]
    else:
        bodies = [vocab[prompts_rng.integers(0, len(vocab), length)].tolist() for length in draw_lengths(spec.prompt, n, lengths_rng)]
        outputs = drawn_outputs.tolist()
    requests = []
    for i, (body, output_len) in enumerate(zip(bodies, outputs)):
        prompt = (prefixes[i % len(prefixes)] if prefixes else []) + body
        params = SamplingParams(max_tokens=int(output_len), temperature=spec.temperature, ignore_eos=spec.ignore_eos,
                                n=spec.n, detokenize=spec.detokenize)
        requests.append(PlannedRequest(str(i), prompt, params))
    too_long = [r for r in requests if r.total_len > max_model_len]
    if too_long:
        r = max(too_long, key=lambda r: r.total_len)
        raise UserError(f"workload: {len(too_long)} requests exceed max_model_len {max_model_len} (the longest needs "
                        f"{r.total_len} tokens); shorten the workload's lengths")
    return requests
