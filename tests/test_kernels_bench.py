"""Benchmark plumbing (CPU) and pytest-benchmark microbenchmarks of the kernels (``gpu`` marker).

The figures the targets name come from ``python -m kernels.bench``, not from these: with
``--benchmark-disable`` (the default addopts) each benchmark runs its function once, as a test.
"""

from __future__ import annotations

import json

import pytest
import torch

from kernels import device_peaks as peaks_mod
from kernels import reference
from kernels.bench import LayerShape, Row, causal_flops, kv_bytes, layer_problems, summary
from kernels.device_peaks import DevicePeaks


def test_device_peaks_measures_once_per_gpu_name(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    calls = []

    def fake_measure(device):
        calls.append(device)
        return DevicePeaks(3.0e12, 8.0e14, "Fake GPU")

    monkeypatch.setattr(peaks_mod, "measure_peaks", fake_measure)
    monkeypatch.setattr(peaks_mod.torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    first = peaks_mod.device_peaks("cuda:0")
    second = peaks_mod.device_peaks("cuda:0")
    assert first == second == DevicePeaks(3.0e12, 8.0e14, "Fake GPU")
    assert len(calls) == 1
    saved = json.loads((tmp_path / "device_peaks.json").read_text())
    assert saved["Fake GPU"]["read_bw_bytes_per_s"] == 3.0e12 and "measured_at" in saved["Fake GPU"]
    peaks_mod.device_peaks("cuda:0", refresh=True)
    assert len(calls) == 2


def test_roofline_counts():
    # K and V of one token: 8 heads x 128 dims x 2 bytes, twice.
    assert kv_bytes(1, torch.bfloat16) == 2 * 8 * 128 * 2
    # A full causal prefill of n tokens sees n(n+1)/2 (query, key) pairs, 4 flops x D per pair and head.
    assert causal_flops(1, 0, 4) == 4.0 * 32 * 128 * 10
    # A chunk after context sees the whole context too.
    assert causal_flops(2, 10, 1) == 4.0 * 2 * 32 * 128 * 11


def test_summary_reports_worst_paging_ratio():
    def row(addressing, block_size, batch, t):
        return Row("decode", addressing, block_size, batch, 4096, 1, 1, t, 10**9, 0.0, 0.5, 0.0)

    rows = [row("contiguous", 0, 1, 100.0), row("paged", 16, 1, 103.0),
            row("contiguous", 0, 64, 100.0), row("paged", 16, 64, 110.0)]
    text = summary(rows, DevicePeaks(3e12, 8e14, "Fake GPU"))
    assert "worst paged/contiguous, block size 16: 1.100 at batch 64 ctx 4096" in text
    assert "target paged decode b64 ctx4096 bs16: 50.0% of B" in text


def test_layer_problems_count_bytes_once():
    shape = LayerShape("tiny", hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, qk_norm=True)
    problems = layer_problems(shape, 3, torch.bfloat16, torch.device("cpu"))
    assert problems["rms_norm"][1] == (2 * 3 * 64 + 64) * 2  # x read, out written, weight
    assert problems["silu_and_mul"][1] == 3 * 3 * 96 * 2  # gate and up read, out written
    # q and k read and written, one cos/sin row and position per token, two norm weights
    assert problems["rotary_embedding"][1] == 2 * 3 * 6 * 16 * 2 + 3 * (16 * 2 + 8) + 2 * 16 * 2
    for op, (args, _) in problems.items():
        getattr(reference, op)(*args)  # the arguments are what the op takes


def test_summary_totals_one_decoder_layer():
    def row(op, impl, t):
        return Row(op, impl, 0, 256, 0, 0, 0, t, 10**6, 0.0, 0.5, 0.0, "qwen3-0.6b")

    rows = [row("rms_norm", "triton", 2.0), row("rms_norm", "torch", 6.0),
            row("add_rms_norm", "triton", 3.0), row("add_rms_norm", "torch", 9.0),
            row("silu_and_mul", "triton", 4.0), row("silu_and_mul", "torch", 8.0),
            row("rotary_embedding", "triton", 5.0), row("rotary_embedding", "torch", 30.0)]
    text = summary(rows, DevicePeaks(3e12, 8e14, "Fake GPU"))
    assert "qwen3-0.6b T=256 add_rms_norm: triton 3.0 us" in text and "torch 9.0 us: 3.00x" in text
    assert "qwen3-0.6b T=256 per decoder layer (2 add_rms_norm + rotary + silu_and_mul): triton 15.0 us, torch 56.0 us" in text
    rows += [row("silu_and_mul", "triton-eager", 20.0), row("silu_and_mul", "torch-eager", 25.0)]
    text = summary(rows, DevicePeaks(3e12, 8e14, "Fake GPU"))
    assert "torch 8.0 us: 2.00x; eager triton 20.0 us, torch 25.0 us" in text


@pytest.fixture
def decode_problem():
    from kernels.bench import Cache, HEAD_DIM, HEADS

    cache = Cache(64, 4096, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(64, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return cache, q


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [0, 1, 16])
def test_bench_decode(benchmark, decode_problem, block_size):
    from kernels import triton_ops

    cache, q = decode_problem

    def run():
        out = triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, max_seq_len=cache.length,
                                          validate=False, **cache.addressing(block_size))
        torch.cuda.synchronize()
        return out

    assert torch.isfinite(benchmark(run)).all()


@pytest.mark.gpu
def test_bench_prefill(benchmark):
    from kernels import triton_ops
    from kernels.bench import Cache, HEAD_DIM, HEADS

    cache = Cache(1, 4096, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(4096, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    qsl = torch.tensor([0, 4096], dtype=torch.int32, device="cuda")

    def run():
        out = triton_ops.prefill_attention(q, cache.k, cache.v, qsl, cache.seq_lens, max_query_len=4096,
                                           validate=False, **cache.addressing(16))
        torch.cuda.synchronize()
        return out

    assert torch.isfinite(benchmark(run)).all()
