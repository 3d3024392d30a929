"""What the two transformers baselines share: loading the model, a request's row, an error's output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from engines.detokenizer import SampleStream
from engines.model.loader import resolve_dtype
from engines.model.random_weights import drawn_at_load
from engines.request import FinishReason, Request, RequestOutput

POLL_SECONDS = 0.01  # how long step() waits for the worker before returning nothing


def require_weight_files(engine: str, cfg) -> None:
    """transformers reads safetensors only: a directory whose weights are drawn at load is refused up front."""
    if drawn_at_load(cfg.raw):
        raise ValueError(f"engine {engine} loads weights with transformers from safetensors; model.source=random has none: "
                         "use model.source=files")


def load_hf_model(model_dir: Path, dtype: str, device: torch.device, attn_implementation: str, cfg) -> torch.nn.Module:
    torch_dtype = resolve_dtype(cfg, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


@dataclass
class Row:
    request: Request
    index: int
    stream: SampleStream
    aborted: bool = False


def error_output(row: Row, error: BaseException) -> RequestOutput:
    return RequestOutput(
        request_id=row.request.request_id, index=row.index, new_token_ids=[], token_times=[], finished=True,
        finish_reason=FinishReason.ERROR, error=f"{type(error).__name__}: {error}",
        num_prompt_tokens=row.request.num_prompt_tokens,
    )
