"""Our decoder-only LM (Llama, Mistral, Qwen2, Qwen3 families) over a flattened token batch.

``forward`` takes the step's tokens, their positions, the whole KV cache
``[num_layers, 2, num_slots, Hkv, D]`` and the step's ``AttentionMetadata``: the
engines hand in everything the model reads; no global state.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engines.kv.metadata import AttentionMetadata
from engines.model.attention import Attention
from engines.model.config import ModelConfig
from engines.model.layers import GatedMLP, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, positions, k_cache, v_cache, meta, ops) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, k_cache, v_cache, meta, ops)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = ops  # the kernel backend (kernels.reference or kernels.triton_ops)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's tokens (their K/V are written to the cache)."""
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, kv_cache[i, 0], kv_cache[i, 1], meta, self.ops)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for the rows that sample a token."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def allocate_kv_cache(self, num_slots: int, device: torch.device | None = None) -> torch.Tensor:
        """One tensor for every layer's K and V: [num_layers, 2, num_slots, Hkv, D]."""
        c = self.cfg
        return torch.zeros(
            c.num_layers, 2, num_slots, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=device or self.device
        )
