"""The roofline floor of a run (docs/methodology.md, "The roofline"), and its efficiency against the measured time.

``T_floor = prefill_FLOPs / (N F) + (KV_bytes_read_in_decode + n_decode_steps_min * weight_bytes) / (N B)
+ all_reduce_bytes * 2 (N - 1) / N / B_bus``
with ``n_decode_steps_min = max(longest output, ceil(total output tokens / concurrency bound))``:
prefill at the matmul peak F, decode at the read-bandwidth peak B (every decode step reads
all weights once and each sequence's whole KV cache), over N GPUs (tensor parallel: each holds
1/N of the weights and KV, and every token's hidden state is all-reduced after each attention
and MLP block and the embedding, at the measured bus bandwidth B_bus of the group's all-reduce;
nothing at N = 1). ``efficiency = T_floor / T_measured``.
The formula is pure; only ``device_ceilings`` touches a GPU (kernels.device_peaks, CUDA only).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from engines.model.config import DTYPES, ModelConfig


def prefill_flops(cfg: ModelConfig, prompt_lens: Sequence[int]) -> float:
    """2 FLOPs per parameter per prompt token, plus causal attention (QK^T and PV over the prompt)."""
    attention_per_pair = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    return float(sum(2 * cfg.num_parameters() * p + attention_per_pair * p * (p + 1) / 2 for p in prompt_lens))


def decode_kv_bytes(kv_bytes_per_token: int, prompt_lens: Sequence[int], output_lens: Sequence[int]) -> float:
    """KV bytes decode reads: the step making token j+1 of a sequence reads prompt + j tokens, j = 1..output-1."""
    return float(kv_bytes_per_token * sum((o - 1) * p + (o - 1) * o / 2 for p, o in zip(prompt_lens, output_lens) if o > 1))


def min_decode_steps(output_lens: Sequence[int], concurrency_bound: int) -> int:
    return max(max(output_lens, default=0), math.ceil(sum(output_lens) / max(concurrency_bound, 1)))


def floor_time(prefill: float, kv_bytes: float, decode_steps: int, weight_bytes: float, flops_per_s: float, bytes_per_s: float) -> float:
    return prefill / flops_per_s + (kv_bytes + decode_steps * weight_bytes) / bytes_per_s


def all_reduce_bytes(cfg: ModelConfig, request_prompt_lens: Sequence[int], sample_output_lens: Sequence[int]) -> float:
    """Bytes of hidden states a tensor-parallel run all-reduces: every token computed (each prompt once, each sampled
    token but the last) is summed after the embedding and after each layer's attention and MLP."""
    tokens = sum(request_prompt_lens) + sum(max(o - 1, 0) for o in sample_output_lens)
    itemsize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    return float(tokens * (2 * cfg.num_layers + 1) * cfg.hidden_size * itemsize)


def roofline(
    cfg: ModelConfig,
    request_prompt_lens: Sequence[int],
    sample_prompt_lens: Sequence[int],
    sample_output_lens: Sequence[int],
    concurrency_bound: int,
    measured_s: float,
    flops_per_s: float,
    bytes_per_s: float,
    num_gpus: int = 1,
    bus_bytes_per_s: float = math.inf,
) -> dict[str, float]:
    """The floor and efficiency of a run: prompts once per request (samples share them), KV reads per sample; over
    ``num_gpus`` GPUs of ``flops_per_s`` and ``bytes_per_s`` each, all-reducing at ``bus_bytes_per_s``."""
    weight_bytes = cfg.num_parameters() * torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    t = floor_time(
        prefill_flops(cfg, request_prompt_lens),
        decode_kv_bytes(cfg.kv_bytes_per_token, sample_prompt_lens, sample_output_lens),
        min_decode_steps(sample_output_lens, concurrency_bound),
        weight_bytes, num_gpus * flops_per_s, num_gpus * bytes_per_s,
    )
    t_all_reduce = 0.0
    if num_gpus > 1:
        moved = all_reduce_bytes(cfg, request_prompt_lens, sample_output_lens) * 2 * (num_gpus - 1) / num_gpus
        t_all_reduce = moved / bus_bytes_per_s
    t += t_all_reduce
    total_out = sum(sample_output_lens)
    return {
        "roofline_floor_s": t, "roofline_efficiency": t / measured_s if measured_s > 0 else math.nan,
        "roofline_output_tok_s": total_out / t if t > 0 else math.nan,
        "roofline_all_reduce_s": t_all_reduce, "roofline_num_gpus": num_gpus,
        "peak_bf16_flops_per_s": flops_per_s, "peak_read_bytes_per_s": bytes_per_s,
    }


def device_ceilings(device: torch.device) -> tuple[float, float] | None:
    """(bf16 FLOP/s, read bytes/s) measured once per GPU model and cached; None off CUDA."""
    if device.type != "cuda":
        return None
    from kernels.device_peaks import (
        device_peaks,  # a GPU measurement: imported only where there is one
    )

    peaks = device_peaks(device)
    return peaks.bf16_flops_per_s, peaks.read_bw_bytes_per_s
