"""Benchmark plumbing (CPU) and pytest-benchmark microbenchmarks of the kernels (``gpu`` marker).

The figures the targets name come from ``python -m kernels.bench``, not from these: with
``--benchmark-disable`` (the default addopts) each benchmark runs its function once, as a test.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch

from kernels import bench, reference
from kernels import device_peaks as peaks_mod
from kernels.bench import (
    CsvLog,
    LayerShape,
    Row,
    causal_flops,
    interleaved,
    kv_bytes,
    layer_problems,
    median_us,
    parse_args,
    summary,
)
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



def test_passes_option():
    assert parse_args([]).passes == 3
    assert parse_args(["--passes", "5", "--decode-cases", "1x512"]).passes == 5
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parse_args(["--passes", bad])


def test_interleaved_times_every_variant_once_per_pass():
    calls = []

    def timer(name, values):
        it = iter(values)
        return lambda: calls.append(name) or next(it)

    times = interleaved({"c": timer("c", [3.0, 1.0, 2.0]), "p16": timer("p16", [5.0, 4.0, 9.0])}, 3)
    assert calls == ["c", "p16"] * 3
    assert times == {"c": [3.0, 1.0, 2.0], "p16": [5.0, 4.0, 9.0]}
    assert median_us(times["c"]) == 2.0 and median_us(times["p16"]) == 5.0
    assert median_us([1.0, 4.0]) == 2.5
    assert math.isnan(median_us([1.0, math.nan, 2.0])) and math.isnan(median_us([]))


def test_decode_rows_report_medians_of_interleaved_passes(monkeypatch):
    """The decode section on the CPU with a fake timer: one row per variant, in the usual order,
    time_us the median of its passes and the ratios in the summary taken from the medians."""
    calls = []
    # Per pass, in variant order: contiguous, paged 1, paged 16, paged 256, no split (long case), sdpa.
    per_pass = {(2, 64): [[10.0, 11.0, 12.0, 13.0, 20.0], [10.4, 10.2, 10.3, 10.9, 21.0], [9.0, 10.5, 9.3, 13.5, 19.0]],
                (1, 128): [[32.0, 31.0, 31.0, 32.0, 90.0, 29.0], [31.0, 33.0, 33.0, 34.0, 92.0, 28.0],
                           [33.0, 32.0, 32.0, 31.0, 91.0, 27.0]]}
    values = iter(t for case in per_pass.values() for one_pass in case for t in one_pass)

    def fake_time_us(fn, rep_ms):
        calls.append(fn)
        return next(values)

    monkeypatch.setattr(bench, "time_us", fake_time_us)
    plan = dataclasses.replace(bench.QUICK, block_sizes=(1, 16, 256), long_context=128, decode_cases=((2, 64), (1, 128)),
                               decode_passes=3)
    peaks = DevicePeaks(3e12, 8e14, "Fake GPU")
    rows = list(bench.decode_rows(plan, peaks, torch.bfloat16, torch.device("cpu")))
    assert len(calls) == 3 * 5 + 3 * 6 and next(values, None) is None
    # The same variant's closure is timed in every pass (not one closure per pass).
    assert calls[0] is calls[5] is calls[10]
    keys = [(r.batch, r.context, r.kernel, r.addressing, r.block_size) for r in rows]
    assert keys == [(2, 64, "decode", "contiguous", 0), (2, 64, "decode", "paged", 1), (2, 64, "decode", "paged", 16),
                    (2, 64, "decode", "paged", 256), (2, 64, "decode", "sdpa", 0),
                    (1, 128, "decode", "contiguous", 0), (1, 128, "decode", "paged", 1), (1, 128, "decode", "paged", 16),
                    (1, 128, "decode", "paged", 256), (1, 128, "decode_nosplit", "paged", 16), (1, 128, "decode", "sdpa", 0)]
    for i, r in enumerate(rows[:5]):
        passes = [one_pass[i] for one_pass in per_pass[(2, 64)]]
        assert r.time_us == sorted(passes)[1]
        assert r.time_us_passes == ";".join(f"{t:.3f}" for t in passes)
        assert r.gbps == pytest.approx(r.bytes_read / r.time_us / 1e3)
    assert rows[0].time_us == 10.0 and rows[2].time_us == 10.3 and rows[2].time_us_passes == "12.000;10.300;9.300"
    assert rows[9].splits == 1 and rows[9].time_us == 91.0
    text = summary(rows, peaks)
    # b2 ctx64: paged 16 median 10.3 over contiguous median 10.0 (no single pass gives 1.030).
    assert "    2     64       10.0       10.3  1.030  1.050  1.300" in text
    assert "worst paged/contiguous, block size 16: 1.030 at batch 2 ctx 64 (<= 1.05)" in text


def test_csv_keeps_passes_and_their_count(tmp_path):
    path = tmp_path / "out" / "kernels_bench.csv"
    log = CsvLog(path, {"gpu": "Fake GPU", "decode_passes": 3})
    log.add(Row("decode", "paged", 16, 1, 512, 1, 8, 10.43, 2 * 10**6, 0.0, 0.5, 0.0,
                time_us_passes="10.500;10.430;10.200"))
    log.add(Row("prefill", "contiguous", 0, 1, 0, 4096, 0, 100.0, 10**6, 0.0, 0.5, 300.0))
    log.fh.close()
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["time_us"] for r in rows] == ["10.43", "100.0"]
    assert [r["time_us_passes"] for r in rows] == ["10.500;10.430;10.200", ""]
    assert all(r["decode_passes"] == "3" and r["gpu"] == "Fake GPU" for r in rows)
    assert [float(t) for t in rows[0]["time_us_passes"].split(";")] == [10.5, 10.43, 10.2]


@pytest.fixture
def decode_problem():
    from kernels.bench import HEAD_DIM, HEADS, Cache

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
    from kernels.bench import HEAD_DIM, HEADS, Cache

    cache = Cache(1, 4096, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(4096, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    qsl = torch.tensor([0, 4096], dtype=torch.int32, device="cuda")

    def run():
        out = triton_ops.prefill_attention(q, cache.k, cache.v, qsl, cache.seq_lens, max_query_len=4096,
                                           validate=False, **cache.addressing(16))
        torch.cuda.synchronize()
        return out

    assert torch.isfinite(benchmark(run)).all()
