"""The decoder's building blocks, numerically matching transformers' Llama/Qwen code."""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from engines.model.config import ModelConfig
from engines.model.parallel import TPGroup


class RMSNorm(nn.Module):
    """The weight and epsilon of an RMSNorm; the kernel backend (``ops.rms_norm``) applies it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3's long-context rescaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the model's context (``ops.rotary_embedding`` applies them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cos_sin", torch.empty(cfg.max_position_embeddings, cfg.head_dim), persistent=False)

    @torch.no_grad()
    def init_table(self, dtype: torch.dtype) -> None:
        inv_freq = rope_inv_freq(self.cfg).to(self.cos_sin.device)
        t = torch.arange(self.cfg.max_position_embeddings, device=self.cos_sin.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # stored in the model dtype, as transformers casts cos/sin before applying them
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


class GatedMLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul, over this rank's MLP columns; the down
    projection's partial sums are joined by one all-reduce (its bias, if any, added by rank 0 alone)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        local = intermediate // tp.size
        self.gate_up_proj = nn.Linear(hidden, 2 * local, bias=bias)
        self.down_proj = nn.Linear(local, hidden, bias=bias and tp.rank == 0)

    def forward(self, x: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        act = ops.linear_silu_and_mul(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
        return self.tp.all_reduce(ops.linear(act, self.down_proj.weight, self.down_proj.bias))


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the vocabulary (``TPGroup.vocab_rows``): a token another rank holds looks up zeros here,
    and one all-reduce sums the ranks' lookups. The LM head reads the same rows (tied or its own weight)."""

    def __init__(self, vocab: int, hidden: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.rows = tp.vocab_rows(vocab)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))
