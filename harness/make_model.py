"""``harness make-model``: write a Hugging Face model directory with random weights of a preset's shape."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engines.model.config import ModelConfig
from harness.presets import Preset, get_preset
from harness.tokenizer_builder import build_tokenizer

DEFAULT_SHARD_BYTES = 4 * 2**30
# Bump when what make_model writes changes, so caches built by older code are not reused.
MODEL_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


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


def init_device(requested: str = "auto") -> torch.device:
    """Where random weights are drawn: a GPU draws an 8B model in a second, a CPU takes minutes.

    A seed gives the same weights on every machine with the same kind of device (CPU and CUDA
    random streams differ), so the device type is part of a cached model's name.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def random_tensor(
    name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, std: float, device: torch.device
) -> torch.Tensor:
    """Norm weights are 1 + N(0, std) (so a test sees a misplaced one), the rest N(0, std); seeded per tensor."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
    if name.endswith("norm.weight"):
        t = 1.0 + t
    return t.to(dtype).cpu()


def make_model(
    preset: str | Preset,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str = "auto",
) -> Path:
    """Write config.json, safetensors (sharded above ``shard_bytes``), tokenizer and generation config."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    draw_on = init_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(preset.config["vocab_size"], preset.chat)
    chat = preset.chat
    ids = {tok: tokenizer.token_to_id(tok) for tok in chat.specials}
    eos_ids = [ids[t] for t in chat.eos]
    bos_id = ids[chat.bos] if chat.bos else None
    config = {**preset.config, "torch_dtype": dtype, "bos_token_id": bos_id, "eos_token_id": eos_ids[0],
              "pad_token_id": ids[chat.pad], "kvbench_preset": preset.name, "kvbench_seed": seed,
              "kvbench_init_device": draw_on.type}
    cfg = ModelConfig.from_dict(config)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    _write_weights(out, hf_weight_shapes(cfg), seed, torch_dtype, shard_bytes, preset.init_std, draw_on)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0], "pad_token_id": ids[chat.pad]},
        indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": chat.bos, "eos_token": chat.eos[0], "pad_token": chat.pad,
        "add_bos_token": chat.add_bos, "model_max_length": cfg.max_position_embeddings,
        "chat_template": chat.template,
    }, indent=2))
    (out / "README.md").write_text(
        f"# {preset.name} (random weights)\n\nWritten by `harness make-model --preset {preset.name} --seed {seed}`: "
        "the exact shape of the real architecture with random weights, for measuring speed and memory. "
        "The text it generates is meaningless.\n")
    return out


def _write_weights(
    out: Path, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, shard_bytes: int, std: float,
    device: torch.device,
) -> None:
    elem = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = elem * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file({n: random_tensor(n, shapes[n], seed, dtype, std, device) for n in shards[0]}, out / "model.safetensors",
                  metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], seed, dtype, std, device) for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def ensure_model(preset: str, *, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """The cached directory of a preset, built once (atomically, so a crash leaves no half model)."""
    device = init_device()
    target = cache_root() / "models" / f"{preset}-seed{seed}-{dtype}-{device.type}-v{MODEL_FORMAT}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=target.parent))
    try:
        make_model(preset, tmp, seed=seed, dtype=dtype, device=device.type)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
