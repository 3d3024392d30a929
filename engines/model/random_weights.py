"""Seeded random weights of a Hugging Face checkpoint's shape, drawn tensor by tensor on a device.

``harness make-model`` writes these draws to safetensors; a directory whose config.json says
``"kvbench_weights": "random"`` has none, and the loader draws the same tensors on the device
at load. A seed gives the same weights on every device of one type, but CPU and CUDA random
streams differ, so a directory records the device type its weights are drawn on.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

from engines.model.config import DTYPES, ModelConfig, ModelLoadError

WEIGHTS_KEY = "kvbench_weights"  # config.json: "random" = no weight files, drawn at load
DRAWN = "random"


def drawn_at_load(raw: dict[str, Any]) -> bool:
    """Whether a config.json describes a directory without weight files, whose weights are drawn at load."""
    return raw.get(WEIGHTS_KEY) == DRAWN


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this shape holds, by name."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, rows in (("q_proj", cfg.num_heads * d), ("k_proj", cfg.num_kv_heads * d), ("v_proj", cfg.num_kv_heads * d)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, h)
            if cfg.qkv_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_heads * d)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            shapes[p + f"mlp.{name}.weight"] = shape
            if cfg.mlp_bias:
                shapes[p + f"mlp.{name}.bias"] = (shape[0],)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def draw_tensor(
    name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, std: float, device: torch.device
) -> torch.Tensor:
    """Norm weights are 1 + N(0, std) (so a test sees a misplaced one), the rest N(0, std); seeded per tensor.

    Drawn in float32 on ``device`` and cast to ``dtype`` there, so the result depends on the device type only.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
    if name.endswith("norm.weight"):
        t = 1.0 + t
    return t.to(dtype)


def draw_device(cfg: ModelConfig, target: torch.device) -> torch.device:
    """Where to draw a directory's weights: the target itself when it is of the recorded device type
    (no copy), else a device of that type, since another type's random stream gives other weights."""
    recorded = torch.device(_need(cfg, "kvbench_init_device"))
    if recorded.type == target.type:
        return target
    if recorded.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("config.json: the weights are drawn on cuda (kvbench_init_device), and there is no CUDA "
                             "device here; a CPU draws other weights (build the directory on this machine)")
    return recorded


def draw_checkpoint(cfg: ModelConfig, target: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor, in the checkpoint's dtype, on ``target``: the bytes
    ``harness make-model`` writes for the directory's preset, seed and dtype, drawn on the same device type."""
    seed, std = int(_need(cfg, "kvbench_seed")), float(_need(cfg, "kvbench_init_std"))
    device, dtype = draw_device(cfg, target), DTYPES[cfg.dtype]
    for name, shape in hf_weight_shapes(cfg).items():
        yield name, draw_tensor(name, shape, seed, dtype, std, device).to(target)


def _need(cfg: ModelConfig, key: str) -> Any:
    if key not in cfg.raw:
        raise ModelLoadError(f"config.json says {WEIGHTS_KEY}={DRAWN!r} but lacks {key!r}")
    return cfg.raw[key]
