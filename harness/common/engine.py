"""What the benchmark and the server both do with an engine: find the model, build the engine, warm it up."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from engines.base import Engine
from engines.request import Request, SamplingParams
from harness.common.schema import ModelSpec
from harness.models.make_model import ensure_model


def resolve_model_dir(spec: ModelSpec) -> Path:
    if spec.path is not None:
        return Path(spec.path)
    return ensure_model(spec.preset, seed=spec.seed, dtype=spec.dtype, weights=spec.source == "files")


def regular_token_ids(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """Ids a prompt may use: below the model's vocabulary and not special (added) tokens."""
    special = set(tokenizer.get_added_tokens_decoder())
    ids = np.arange(min(vocab_size, tokenizer.get_vocab_size()))
    return ids[~np.isin(ids, list(special))]


def warmup_requests(token_ids: np.ndarray, num_requests: int) -> list[Request]:
    """A few short requests (8 prompt tokens, 4 output) that exercise prefill and decode before anything is measured."""
    return [Request(f"warmup-{i}", token_ids[np.arange(8) * (i + 1) % len(token_ids)].tolist(),
                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            for i in range(num_requests)]


def warm_up(engine: Engine, token_ids: np.ndarray, num_requests: int) -> None:
    """Run a few short requests before measuring, so one-time costs (lazy init, allocator growth) stay out."""
    requests = warmup_requests(token_ids, num_requests)
    if requests:
        engine.generate(requests)


def freeze_heap() -> None:
    """Take every object alive now (the engine just built: its model, its KV manager's blocks) out of the cyclic
    garbage collector's scans, as vLLM does after start-up. A collection then costs what a step allocates, not what
    the engine holds, which would differ between engines (a paged engine keeps a Python object per block)."""
    gc.collect()
    gc.freeze()


def compute_dtype(engine: Any) -> str | None:
    """The dtype the engine's model computes in (float32 on a CPU whatever the checkpoint's dtype)."""
    dtype = getattr(getattr(engine, "model", None), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None
