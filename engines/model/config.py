"""The decoder shape, read from a Hugging Face ``config.json`` and checked at the boundary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(ValueError):
    """A model directory we cannot load; the message names the file or field."""


# architecture name in config.json -> (family, q/k/v bias by default, q/k RMSNorm)
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_context(self) -> int:
        """Longest sequence the model takes (a sliding window bounds what each token attends to, not this)."""
        return self.max_position_embeddings

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, at the model's dtype."""
        elem = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        per_layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from e
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(raw, generation=gen)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> "ModelConfig":
        archs = raw.get("architectures") or []
        supported = ", ".join(ARCHITECTURES)
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ModelLoadError(f"unsupported architecture {archs!r}: supported are {supported}")
        arch = archs[0]
        family, default_bias, qk_norm = ARCHITECTURES[arch]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported hidden_act {act!r}: only silu (SwiGLU) decoders are supported")

        def need(key: str) -> Any:
            if key not in raw:
                raise ModelLoadError(f"config.json lacks {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ModelLoadError(f"unsupported rope_type {rope_type!r}: supported are default and llama3")
        use_window = raw.get("use_sliding_window", family == "mistral")
        window = raw.get("sliding_window") if use_window else None
        dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16")
        if dtype not in DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype!r} in config.json: supported are {', '.join(DTYPES)}")
        generation = generation or {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        cfg = cls(
            architecture=arch,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("attention_bias", default_bias)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=qk_norm,
            rope_scaling=rope if rope_type == "llama3" else None,
            sliding_window=int(window) if window else None,
            dtype=dtype,
            eos_token_ids=eos_ids,
            bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
            raw=raw,
        )
        cfg._check()
        return cfg

    def _check(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"config.json: head_dim {self.head_dim} must be even for rotary embeddings")
        if not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise ModelLoadError(f"config.json: rope_theta must be positive, got {self.rope_theta}")
