"""The roofline formula of docs/methodology.md on hand values (pure; no GPU needed)."""

from __future__ import annotations

import pytest

from engines.model.config import ModelConfig
from harness.bench.roofline import decode_kv_bytes, floor_time, min_decode_steps, prefill_flops, roofline
from harness.models.presets import get_preset


def test_floor_time_formula():
    # 1e12 FLOPs at 1e12 FLOP/s = 1 s; (2e9 KV bytes + 10 steps x 1e9 weight bytes) at 4e9 B/s = 3 s
    assert floor_time(1e12, 2e9, 10, 1e9, 1e12, 4e9) == pytest.approx(4.0)


def test_decode_steps_are_bounded_by_the_longest_output_and_the_concurrency():
    assert min_decode_steps([10, 3, 3], concurrency_bound=8) == 10  # the longest output dominates
    assert min_decode_steps([10, 10, 10, 10], concurrency_bound=2) == 20  # ceil(40 / 2)
    assert min_decode_steps([5, 5, 5], concurrency_bound=2) == 8  # ceil(15 / 2)


def test_decode_reads_every_earlier_token_once_per_step():
    # prompt 4, output 3: steps making tokens 2 and 3 read 5 and 6 tokens
    assert decode_kv_bytes(10, [4], [3]) == 10 * (5 + 6)
    assert decode_kv_bytes(10, [4], [1]) == 0


def test_prefill_flops_count_matmuls_and_causal_attention():
    cfg = ModelConfig.from_dict(get_preset("tiny-qwen3").config)
    p = 10
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * p * (p + 1) / 2
    assert prefill_flops(cfg, [p]) == pytest.approx(2 * cfg.num_parameters() * p + attention)


def test_efficiency_is_floor_over_measured():
    cfg = ModelConfig.from_dict(get_preset("tiny-qwen3").config)
    r = roofline(cfg, [8], [8], [4], concurrency_bound=1, measured_s=2.0, flops_per_s=1e12, bytes_per_s=1e11)
    assert r["roofline_efficiency"] == pytest.approx(r["roofline_floor_s"] / 2.0)
    assert r["roofline_output_tok_s"] == pytest.approx(4 / r["roofline_floor_s"])


def test_n_gpus_share_the_work_and_pay_the_all_reduces():
    """Two GPUs halve the compute and memory terms and add the all-reduced bytes at the bus bandwidth: every token
    computed (8 prompt + 3 decoded) x (2 per layer + the embedding) rows of hidden x bf16, 2 (N-1)/N of it moved."""
    cfg = ModelConfig.from_dict(get_preset("tiny-qwen3").config)
    args = (cfg, [8], [8], [4])
    one = roofline(*args, concurrency_bound=1, measured_s=1.0, flops_per_s=1e12, bytes_per_s=1e11)
    two = roofline(*args, concurrency_bound=1, measured_s=1.0, flops_per_s=1e12, bytes_per_s=1e11, num_gpus=2,
                   bus_bytes_per_s=1e9)
    moved = (8 + 3) * (2 * cfg.num_layers + 1) * cfg.hidden_size * 2 * (2 * 1 / 2)
    assert one["roofline_all_reduce_s"] == 0 and one["roofline_num_gpus"] == 1
    assert two["roofline_all_reduce_s"] == pytest.approx(moved / 1e9)
    assert two["roofline_floor_s"] == pytest.approx(one["roofline_floor_s"] / 2 + moved / 1e9)
