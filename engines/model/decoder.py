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
from engines.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, VocabParallelEmbedding
from engines.model.parallel import TPGroup


class DecoderLayer(nn.Module):
    """One layer, in the two halves either side of attention (``Attention.attend``), which a step launches on its
    own: it is the one op whose launch depends on the batch's makeup (the rest can replay as CUDA graphs)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, tp)

    def pre_attention(self, x, residual, positions, k_cache, v_cache, slot_mapping, ops, *, q_out=None,
                      residual_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the previous layer's output and the residual stream before it was added (None for the first
        layer; the add fuses with this norm); returns the rotated queries (their K/V written to the cache) and the
        residual stream. ``q_out`` / ``residual_out`` are buffers to write them into (else new tensors)."""
        norm = self.input_layernorm
        if residual is None:
            h = ops.rms_norm(x, norm.weight, norm.eps)
            residual = x if residual_out is None else residual_out.copy_(x)
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps, residual_out=residual_out)
        return self.self_attn.qkv(h, positions, k_cache, v_cache, slot_mapping, ops, q_out=q_out), residual

    def post_attention(self, attn_out, residual, ops, *, residual_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection, the residual add with the second norm, and the MLP: the layer's output and the
        residual stream it is not yet added to."""
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(self.self_attn.project(attn_out, ops), residual, norm.weight, norm.eps,
                                       residual_out=residual_out)
        return self.mlp(h, ops), residual


class CausalLM(nn.Module):
    """The whole model, or at tensor-parallel size > 1 one rank's shard of it (``engines.model.parallel``): the
    forward of every rank's shard together, each given the same inputs, is the model's."""

    def __init__(self, cfg: ModelConfig, ops: ModuleType, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp = tp or TPGroup()
        self.ops = ops  # the kernel backend (kernels.reference or kernels.triton_ops)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rows = self.embed_tokens.rows
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, rows, bias=False)
        self.num_kv_heads = cfg.num_kv_heads // tp.size  # this rank's: its KV cache holds these heads

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's tokens (their K/V are written to the cache): the pieces below,
        with each layer's attention between them."""
        slots = meta.slot_mapping
        q, residual = self.first_piece(input_ids, positions, kv_cache, slots)
        for i, layer in enumerate(self.layers):
            out = torch.empty_like(q)
            layer.self_attn.attend(q, kv_cache[i, 0], kv_cache[i, 1], meta, self.ops, out)
            if i + 1 < len(self.layers):
                q, residual = self.middle_piece(i + 1, out, residual, positions, kv_cache, slots)
        return self.last_piece(out, residual)

    # The forward between attentions, in pieces. Given buffers (``q_out``, ``residual_out``, ``out``), a piece
    # writes its results into them, and the residual stream is updated in place: a piece then reads and writes
    # only buffers its caller owns, so it can be captured as a CUDA graph and replayed for any batch of its size.
    def first_piece(self, input_ids, positions, kv_cache, slot_mapping, *, q_out=None, residual_out=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and layer 0 up to its attention: (queries, residual stream)."""
        return self.layers[0].pre_attention(self.embed_tokens(input_ids), None, positions, kv_cache[0, 0],
                                            kv_cache[0, 1], slot_mapping, self.ops, q_out=q_out,
                                            residual_out=residual_out)

    def middle_piece(self, i: int, attn_out, residual, positions, kv_cache, slot_mapping, *, q_out=None,
                     residual_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i - 1 after its attention, then layer i up to its attention: (queries, residual stream)."""
        x, residual = self.layers[i - 1].post_attention(attn_out, residual, self.ops, residual_out=residual_out)
        return self.layers[i].pre_attention(x, residual, positions, kv_cache[i, 0], kv_cache[i, 1], slot_mapping,
                                            self.ops, q_out=q_out, residual_out=residual_out)

    def last_piece(self, attn_out, residual, *, out=None, residual_out=None) -> torch.Tensor:
        """The last layer after its attention, and the final norm: the hidden states."""
        x, residual = self.layers[-1].post_attention(attn_out, residual, self.ops, residual_out=residual_out)
        return self.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps, out=out,
                                     residual_out=residual_out)[0]

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits [N, vocab] for the rows that sample a token: float32, or in the model's dtype without ``upcast``
        (enough for an argmax, which picks the same token; the upcast costs a pass over [N, vocab] a step)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(hidden, weight)
        if self.tp.size > 1:  # [size * N, rows] in rank order -> [N, size * rows], the padding rows dropped
            n = hidden.shape[0]
            logits = self.tp.all_gather_rows(logits).view(self.tp.size, n, -1).transpose(0, 1).reshape(n, -1)
            logits = logits[:, : self.cfg.vocab_size]
        return logits.float() if upcast else logits

    def allocate_kv_cache(self, num_slots: int, device: torch.device | None = None) -> torch.Tensor:
        """One tensor for every layer's K and V: [num_layers, 2, num_slots, Hkv, D] (this rank's KV heads)."""
        c = self.cfg
        return torch.zeros(
            c.num_layers, 2, num_slots, self.num_kv_heads, c.head_dim, dtype=self.dtype, device=device or self.device
        )
