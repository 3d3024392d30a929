"""One request at a time, greedy, with the plainest cache: the oracle the engines are tested against."""

from __future__ import annotations

import numpy as np
import torch

from engines.kv.metadata import StepSequence, build_metadata
from engines.model.decoder import CausalLM


@torch.no_grad()
def forward_once(model: CausalLM, kv_cache: torch.Tensor, token_ids: list[int], num_computed: int) -> torch.Tensor:
    """Run ``token_ids`` after ``num_computed`` cached tokens of one sequence held at slots 0..n; return the last logits."""
    n = len(token_ids)
    device = model.device
    meta = build_metadata(
        [StepSequence(num_computed, n)],
        np.arange(num_computed, num_computed + n),
        block_tables=None,
        seq_starts=np.zeros(1, dtype=np.int32),
        block_size=1,
        device=device,
    )
    ids = torch.tensor(token_ids, device=device)
    positions = torch.arange(num_computed, num_computed + n, device=device)
    hidden = model(ids, positions, kv_cache, meta)
    return model.compute_logits(hidden[-1:])[0]


@torch.no_grad()
def greedy_generate(
    model: CausalLM, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: tuple[int, ...] = ()
) -> list[int]:
    kv_cache = model.allocate_kv_cache(len(prompt_ids) + max_new_tokens)
    logits = forward_once(model, kv_cache, prompt_ids, 0)
    out: list[int] = []
    while True:
        token = int(logits.argmax())
        out.append(token)
        if len(out) >= max_new_tokens or token in eos_token_ids:
            return out
        logits = forward_once(model, kv_cache, [token], len(prompt_ids) + len(out) - 1)
