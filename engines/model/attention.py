"""Self-attention over a KV cache, addressed through the step's explicit metadata."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engines.kv.metadata import AttentionMetadata
from engines.model.config import ModelConfig
from engines.model.layers import RMSNorm, RotaryEmbedding
from engines.model.parallel import TPGroup


class Attention(nn.Module):
    """This rank's query and KV heads (all of them at tensor-parallel size 1); the output projection's partial sums
    are joined by one all-reduce."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads = cfg.num_heads // tp.size, cfg.num_kv_heads // tp.size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.rms_eps = cfg.rms_norm_eps
        self.window = cfg.sliding_window  # None: full attention

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slot_mapping: torch.Tensor, ops: ModuleType, q_out: torch.Tensor | None = None) -> torch.Tensor:
        """The rotated queries [T, heads, head_dim] (in ``q_out`` if given); the step's keys and values go straight
        to the cache at ``slot_mapping`` (a negative slot writes nothing)."""
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        return ops.rotary_write_kv(positions, q, k, v, self.rotary.cos_sin, *norms, self.rms_eps, k_cache, v_cache,
                                   slot_mapping, validate=False, q_out=q_out)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               ops: ModuleType, out: torch.Tensor) -> None:
        """Attention of the step's queries over the cache, written into ``out`` (q's shape): the decodes' rows
        first, then the prompt chunks'. The one part of a layer whose launch depends on the batch's makeup."""
        n = meta.num_decode_tokens
        if meta.decode is not None:
            d = meta.decode
            ops.decode_attention(
                q[:n], k_cache, v_cache, d.seq_lens, **d.addressing.kernel_kwargs(),
                scale=self.scale, max_seq_len=d.max_seq_len, window=self.window, validate=False, out=out[:n],
            )
        if meta.prefill is not None:
            p = meta.prefill
            ops.prefill_attention(
                q[n:], k_cache, v_cache, p.query_start_loc, p.seq_lens, **p.addressing.kernel_kwargs(),
                scale=self.scale, max_query_len=p.max_query_len, max_seq_len=p.max_seq_len, window=self.window,
                validate=False, out=out[n:],
            )

    def project(self, out: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        """The output projection of attention's rows (their partial sums joined over the ranks)."""
        return self.tp.all_reduce(ops.linear(out.view(-1, self.q_size), self.o_proj.weight, self.o_proj.bias))
