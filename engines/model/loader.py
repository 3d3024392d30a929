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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

import kernels
from engines.model.config import DTYPES, ModelConfig, ModelLoadError
from engines.model.decoder import CausalLM
from engines.model.parallel import TPGroup
from engines.model.random_weights import draw_checkpoint, drawn_at_load, hf_weight_shapes

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


Share = tuple[int, slice]  # (dim, range) of a checkpoint tensor


@dataclass(frozen=True)
class _Place:
    """Where a checkpoint tensor goes: rows ``offset:offset + rows`` of ``param`` take the tensor's ``take`` (this
    rank's share: rows, or columns for a row-parallel weight), or the whole tensor."""

    param: torch.Tensor | None  # None: this rank holds none of it (a row-parallel bias is rank 0's)
    offset: int
    rows: int
    take: Share | None = None  # (dim, range) of the checkpoint tensor; None: all of it


def _target(model: CausalLM, name: str) -> _Place | None:
    """Where checkpoint tensor ``name`` goes on this rank, or None if the model has no place for it."""
    cfg, tp = model.cfg, model.tp
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        module = model.embed_tokens if name.startswith("model.") else model.lm_head
        if module is None:
            return None
        start = min(model.embed_tokens.start, cfg.vocab_size)  # a tiny vocabulary may leave the last ranks none
        rows = max(0, min(cfg.vocab_size - start, model.embed_tokens.rows))
        return _Place(module.weight, 0, rows, (0, slice(start, start + rows)))
    if name == "model.norm.weight":
        return _Place(model.norm.weight, 0, cfg.hidden_size)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m or int(m.group(1)) >= cfg.num_layers:
        return None
    layer = model.layers[int(m.group(1))]
    part, kind = m.group(2), m.group(3)
    attn, mlp = layer.self_attn, layer.mlp
    q, kv, inter = attn.q_size, attn.kv_size, mlp.down_proj.in_features
    column = {  # column parallel: this rank's output rows, fused into one parameter
        "self_attn.q_proj": (attn.qkv_proj, 0, q, tp.split(cfg.num_heads * cfg.head_dim)),
        "self_attn.k_proj": (attn.qkv_proj, q, kv, tp.split(cfg.num_kv_heads * cfg.head_dim)),
        "self_attn.v_proj": (attn.qkv_proj, q + kv, kv, tp.split(cfg.num_kv_heads * cfg.head_dim)),
        "mlp.gate_proj": (mlp.gate_up_proj, 0, inter, tp.split(cfg.intermediate_size)),
        "mlp.up_proj": (mlp.gate_up_proj, inter, inter, tp.split(cfg.intermediate_size)),
    }
    if part in column:
        module, offset, rows, share = column[part]
        param = getattr(module, kind, None)
        return None if param is None else _Place(param, offset, rows, (0, share))
    row = {  # row parallel: this rank's input columns; a bias (the MLP's, if configured) is added once, by rank 0
        "self_attn.o_proj": (attn.o_proj, cfg.num_heads * cfg.head_dim, False),
        "mlp.down_proj": (mlp.down_proj, cfg.intermediate_size, cfg.mlp_bias),
    }
    if part in row:
        module, columns, has_bias = row[part]
        if kind == "bias":
            if not has_bias:
                return None  # a bias this config has no place for
            return _Place(module.bias, 0, cfg.hidden_size) if tp.rank == 0 else _Place(None, 0, 0)
        return _Place(module.weight, 0, cfg.hidden_size, (1, tp.split(columns)))
    module = layer.get_submodule(part) if _has_submodule(layer, part) else None
    param = None if module is None else getattr(module, kind, None)
    return None if param is None else _Place(param, 0, param.shape[0])


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
    tp: TPGroup | None = None,
) -> CausalLM:
    """The model at ``path`` on ``device``, or with ``tp`` this rank's shard of it: a rank reads only its share of each
    tensor from the files, and draws random weights whole and keeps its share, so that a shard is bit for bit a
    slice of the whole model either way."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    device = torch.device(device)
    torch_dtype = resolve_dtype(cfg, dtype, device)
    with torch.device("meta"):
        model = CausalLM(cfg, kernels.load_backend(attn_backend, device), tp)
    model = model.to(torch_dtype).to_empty(device=device)
    model.rotary.init_table(torch_dtype)
    if drawn_at_load(cfg.raw):
        drawn = (("random weights", name, _Whole(t)) for name, t in draw_checkpoint(cfg, device))
        _fill_parameters(model, drawn)
    else:
        _fill_parameters(model, _read_checkpoint(checkpoint_files(path)))
    return model.eval().requires_grad_(False)


class _Whole:
    """A checkpoint tensor in memory (drawn on the device): its share is a view."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def read(self, share: Share | None) -> torch.Tensor:
        if share is None:
            return self.tensor
        dim, rows = share
        return self.tensor.narrow(dim, rows.start, rows.stop - rows.start)


class _OnDisk:
    """A checkpoint tensor in a safetensors file: a rank reads only its share of it (a 70B's shard, not the model)."""

    def __init__(self, f, name: str) -> None:
        self.slice = f.get_slice(name)
        self.shape = tuple(self.slice.get_shape())

    def read(self, share: Share | None) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        if share is not None:
            index[share[0]] = share[1]
        return self.slice[tuple(index)]


def _read_checkpoint(files: dict[str, Path]) -> Iterator[tuple[str, str, _OnDisk]]:
    """(file name, tensor name, tensor to read) of every checkpoint tensor we may need, file by file (each is read
    before the next is yielded, while its file is open)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                if not _IGNORED.match(name):
                    yield file.name, name, _OnDisk(f, name)


@torch.no_grad()
def _fill_parameters(model: CausalLM, tensors: Iterable[tuple[str, str, _Whole | _OnDisk]]) -> None:
    """Copy this rank's share of each (source, name, tensor) into the parameter rows it maps to; every row exactly
    once (the vocabulary's padding rows, on the last rank, are zeros)."""
    expected_shapes = hf_weight_shapes(model.cfg)
    filled: dict[int, int] = {}  # id(param) -> rows filled
    for module in (model.embed_tokens, model.lm_head):
        if module is not None:  # padding rows past the vocabulary: never looked up, their logits dropped
            pad = max(0, module.weight.shape[0] - max(0, model.cfg.vocab_size - model.embed_tokens.start))
            module.weight[module.weight.shape[0] - pad :].zero_()
            filled[id(module.weight)] = pad
    unexpected = []
    for source, name, tensor in tensors:
        target = _target(model, name)
        if target is None:
            unexpected.append(name)
            continue
        expected = expected_shapes.get(name)
        if expected is not None and tensor.shape != expected:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tensor.shape}, but config.json implies {expected}")
        if target.param is None:
            continue
        tensor = tensor.read(target.take)
        param, offset, rows = target.param, target.offset, target.rows
        if tuple(tensor.shape) != (rows, *param.shape[1:]):
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but config.json implies "
                                 f"{(rows, *param.shape[1:])}")
        param[offset : offset + rows].copy_(tensor)
        filled[id(param)] = filled.get(id(param), 0) + rows
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise ModelLoadError(f"checkpoint has {len(unexpected)} tensors this config has no place for (e.g. {shown})")
    missing = [n for n, p in model.named_parameters() if filled.get(id(p), 0) != p.shape[0]]
    if missing:
        shown = ", ".join(missing[:5])
        raise ModelLoadError(f"checkpoint lacks weights for {len(missing)} parameters (e.g. {shown})")
