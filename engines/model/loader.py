"""Load a Hugging Face model directory (safetensors, single or sharded) into ``CausalLM``.

Checkpoint tensors are mapped onto our fused parameters (q/k/v into ``qkv_proj``,
gate/up into ``gate_up_proj``); every shape is checked against the config and every
parameter must be filled exactly once, so a mismatched or partial checkpoint is an error
naming the tensor, not garbage output. A directory whose config.json says
``"kvbench_weights": "random"`` has no weight files: its checkpoint tensors are drawn on the
device (engines.model.random_weights) and placed the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

import kernels
from engines.model.config import DTYPES, ModelConfig, ModelLoadError
from engines.model.decoder import CausalLM
from engines.model.random_weights import draw_checkpoint, drawn_at_load

# Checkpoint tensors that carry nothing we need.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def resolve_device(name: str) -> torch.device:
    """A concrete device: ``auto`` is CUDA when there is one, and a CUDA device always has its index
    (a thread that steps the engine binds to it)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(cfg: ModelConfig, dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is the checkpoint's dtype on a GPU and float32 on a CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it (through the index for sharded checkpoints)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(f"shard {shard.name} listed in {index.name} is missing from {path}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _target(model: CausalLM, name: str) -> tuple[torch.Tensor, int, int] | None:
    """(parameter, row offset, rows) that checkpoint tensor ``name`` fills, or None if unknown."""
    cfg = model.cfg
    if name == "model.embed_tokens.weight":
        return model.embed_tokens.weight, 0, cfg.vocab_size
    if name == "model.norm.weight":
        return model.norm.weight, 0, cfg.hidden_size
    if name == "lm_head.weight":
        if model.lm_head is None:
            return None
        return model.lm_head.weight, 0, cfg.vocab_size
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m or int(m.group(1)) >= cfg.num_layers:
        return None
    layer = model.layers[int(m.group(1))]
    part, kind = m.group(2), m.group(3)
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused = {
        "self_attn.q_proj": (layer.self_attn.qkv_proj, 0, q),
        "self_attn.k_proj": (layer.self_attn.qkv_proj, q, kv),
        "self_attn.v_proj": (layer.self_attn.qkv_proj, q + kv, kv),
        "mlp.gate_proj": (layer.mlp.gate_up_proj, 0, inter),
        "mlp.up_proj": (layer.mlp.gate_up_proj, inter, inter),
    }
    if part in fused:
        module, offset, rows = fused[part]
    else:
        module = layer.get_submodule(part) if _has_submodule(layer, part) else None
        if module is None:
            return None
        offset, rows = 0, getattr(module, "weight").shape[0]
    param = getattr(module, kind, None)
    return None if param is None else (param, offset, rows)


def _has_submodule(module: torch.nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    attn_backend: str = "auto",
) -> CausalLM:
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    device = torch.device(device)
    torch_dtype = resolve_dtype(cfg, dtype, device)
    with torch.device("meta"):
        model = CausalLM(cfg, kernels.load_backend(attn_backend, device))
    model = model.to(torch_dtype).to_empty(device=device)
    model.rotary.init_table(torch_dtype)
    if drawn_at_load(cfg.raw):
        _fill_parameters(model, (("random weights", name, t) for name, t in draw_checkpoint(cfg, device)))
    else:
        _fill_parameters(model, _read_checkpoint(checkpoint_files(path)))
    return model.eval().requires_grad_(False)


def _read_checkpoint(files: dict[str, Path]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file name, tensor name, tensor) of every checkpoint tensor we may need, file by file."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                if not _IGNORED.match(name):
                    yield file.name, name, f.get_tensor(name)


@torch.no_grad()
def _fill_parameters(model: CausalLM, tensors: Iterable[tuple[str, str, torch.Tensor]]) -> None:
    """Copy each (source, name, tensor) into the parameter rows it maps to; every row exactly once."""
    filled: dict[int, int] = {}  # id(param) -> rows filled
    unexpected = []
    for source, name, tensor in tensors:
        target = _target(model, name)
        if target is None:
            unexpected.append(name)
            continue
        param, offset, rows = target
        expected = (rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but config.json implies {expected}"
            )
        param[offset : offset + rows].copy_(tensor)
        filled[id(param)] = filled.get(id(param), 0) + rows
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise ModelLoadError(f"checkpoint has {len(unexpected)} tensors this config has no place for (e.g. {shown})")
    missing = [n for n, p in model.named_parameters() if filled.get(id(p), 0) != p.shape[0]]
    if missing:
        shown = ", ".join(missing[:5])
        raise ModelLoadError(f"checkpoint lacks weights for {len(missing)} parameters (e.g. {shown})")
