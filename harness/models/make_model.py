"""``harness make-model``: write a Hugging Face model directory with random weights of a preset's shape.

Without weights (``weights=False``, ``model.source=random``) the directory holds everything but the
safetensors, and its config.json tells our loader to draw them on the device at load
(engines.model.random_weights): the same tensors, without writing and reading back gigabytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engines.model.config import ModelConfig
from engines.model.random_weights import DRAWN, WEIGHTS_KEY, draw_tensor, hf_weight_shapes
from harness.models.presets import Preset, get_preset
from harness.models.tokenizer_builder import build_tokenizer

DEFAULT_SHARD_BYTES = 4 * 2**30
# Bump when what make_model writes changes, so caches built by older code are not reused.
MODEL_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def init_device(requested: str = "auto") -> torch.device:
    """Where random weights are drawn: a GPU draws an 8B model in a second, a CPU takes minutes.

    A seed gives the same weights on every machine with the same kind of device (CPU and CUDA
    random streams differ), so the device type is part of a cached model's name.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def make_model(
    preset: str | Preset,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str = "auto",
    weights: bool = True,
) -> Path:
    """Write config.json, safetensors (sharded above ``shard_bytes``), tokenizer and generation config.

    ``weights=False`` writes no safetensors: config.json then says the weights are drawn at load
    (with the seed, std and device type to draw them as this function would have written them).
    """
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
    if not weights:
        config.update({WEIGHTS_KEY: DRAWN, "kvbench_init_std": preset.init_std})
    cfg = ModelConfig.from_dict(config)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if weights:
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
    (out / "README.md").write_text(_readme(preset.name, seed, draw_on.type, weights))
    return out


def _readme(preset: str, seed: int, device_type: str, weights: bool) -> str:
    origin = (f"Written by `harness make-model --preset {preset} --seed {seed}`" if weights
              else f"Written for `model.source=random` (preset {preset}, seed {seed})")
    text = (f"# {preset} (random weights)\n\n{origin}: the exact shape of the real architecture with random weights, "
            "for measuring speed and memory. The text it generates is meaningless.\n")
    if not weights:
        text += ("\nThere are no weight files: the weights are drawn on the device at load by kvbench's own engines, seeded, "
                 f"identical to make-model's files drawn on a {device_type} device. transformers cannot load this directory.\n")
    return text


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
        save_file({n: draw_tensor(n, shapes[n], seed, dtype, std, device).cpu() for n in shards[0]}, out / "model.safetensors",
                  metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: draw_tensor(n, shapes[n], seed, dtype, std, device).cpu() for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def ensure_model(preset: str, *, seed: int = 0, dtype: str = "bfloat16", weights: bool = True) -> Path:
    """The cached directory of a preset, built once (atomically, so a crash leaves no half model).

    ``weights=False``: the directory without weight files (make_model's ``weights``), cached under its own name.
    """
    device = init_device()
    kind = "" if weights else "-random"
    target = cache_root() / "models" / f"{preset}-seed{seed}-{dtype}-{device.type}{kind}-v{MODEL_FORMAT}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=target.parent))
    try:
        make_model(preset, tmp, seed=seed, dtype=dtype, device=device.type, weights=weights)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str]) -> int:
    """``harness make-model``."""
    import argparse

    from harness.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog="harness make-model", description=(
        "Write a Hugging Face model directory with random weights of a real architecture's exact shape."))
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-size-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                        help="largest safetensors shard; a larger model is sharded with an index file")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to draw the random weights (a seed's weights differ between CPU and CUDA)")
    args = parser.parse_args(argv)
    out = make_model(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                     shard_bytes=int(args.shard_size_gb * 2**30), device=args.device)
    print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}) to {out}")
    return 0
