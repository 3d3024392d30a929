"""Kernel peers (``kernels.peers``) and their place in ``kernels.bench``.

On the CPU: the host-side conversions (our block table as FlashInfer's page lists and as torch's
PagedAttention maps, the logical block mask), eager FlexAttention and SDPA (math backend) against
the reference kernels, the reasons a peer is unavailable, and the bench's peer rows with fake
peers and timers. On a GPU (``gpu`` marker): every available peer against our Triton kernels,
and the ``peers`` section end to end.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from kernels import bench, peers, reference
from kernels.bench import HEAD_DIM, HEADS, Cache, Row
from kernels.device_peaks import DevicePeaks

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PEAKS = DevicePeaks(3e12, 8e14, "Fake GPU")


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def problem(batch: int, context: int, q_len: int, device=CPU, dtype=torch.float32, seed: int = 0):
    """The bench's cache of ``batch`` sequences of ``context + q_len`` tokens (decode: ``context``),
    a query for the last ``q_len`` tokens of each, a shuffled block table of 16-token pages, and
    our kernels' outputs over the same inputs, paged (through the table) and contiguous."""
    torch.manual_seed(seed)
    length = context + q_len if q_len > 1 else context
    cache = Cache(batch, length, dtype, device, seed=seed)
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, dtype=dtype, device=device)
    table = cache.block_table(16)
    return cache, q, table


def ours(cache: Cache, q: torch.Tensor, q_len: int, table: torch.Tensor | None, kernels=reference) -> torch.Tensor:
    addr = {"block_tables": table, "block_size": 16} if table is not None else {"seq_starts": cache.seq_starts}
    if q_len == 1:
        return kernels.decode_attention(q, cache.k, cache.v, cache.seq_lens, **addr)
    qsl = torch.arange(cache.batch + 1, dtype=torch.int32, device=q.device) * q_len
    return kernels.prefill_attention(q, cache.k, cache.v, qsl, cache.seq_lens, **addr)


# ---------------------------------------------------------------- host-side conversions


def test_flashinfer_layout_of_a_block_table():
    table = torch.tensor([[5, 2, 9], [7, 1, 3], [4, 0, 8]], dtype=torch.int32)
    lens = torch.tensor([33, 16, 0], dtype=torch.int32)
    indptr, indices, last = peers.flashinfer_layout(table, lens, 16)
    # 33 tokens: 3 pages, the last holding 1 token; 16 tokens: one full page; an empty sequence: none.
    assert indptr.tolist() == [0, 3, 4, 4]
    assert indices.tolist() == [5, 2, 9, 7]
    assert last.tolist() == [1, 16, 0]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def test_page_maps_of_a_block_table():
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    page_table, physical_to_logical = peers.page_maps(table, torch.tensor([20, 16]), 16, n_pages=5)
    assert page_table.tolist() == [[2, 0, -1, -1, -1], [1, -1, -1, -1, -1]]  # seq 1 uses one page only
    assert physical_to_logical.tolist() == [[1, -1, 0, -1, -1], [-1, 0, -1, -1, -1]]


def test_decode_block_mask_maps_logical_pages_to_the_table():
    from torch.nn.attention.experimental._paged_attention import PagedAttention

    table = torch.tensor([[6, 1, 4], [0, 7, 2]], dtype=torch.int32)
    lens = torch.tensor([40, 48], dtype=torch.int32)  # 2 full pages + 8 tokens; 3 full pages
    helper = PagedAttention(8, 16, 2, device="cpu")
    helper.page_table, helper.physical_to_logical = peers.page_maps(table, lens, 16, 8)
    mask = helper.convert_logical_block_mask(peers.logical_block_mask(lens, 1, 16, 3))
    assert mask.full_kv_num_blocks.flatten().tolist() == [2, 3]
    assert mask.full_kv_indices[0, 0, 0, :2].tolist() == [6, 1]
    assert mask.full_kv_indices[1, 0, 0, :3].tolist() == [0, 7, 2]
    assert mask.kv_num_blocks.flatten().tolist() == [1, 0]  # the partial page of sequence 0 ...
    assert mask.kv_indices[0, 0, 0, 0].item() == 4  # ... is physical page 4
    assert mask.seq_lengths == (1, 8 * 16)


def test_max_error_is_relative_to_ours_and_fails_on_nan():
    ref = torch.tensor([[2.0, -4.0], [1.0, 0.0]])
    assert peers.max_error(ref + 0.04, ref) == pytest.approx(0.01)
    assert peers.max_error(ref, ref) == 0.0
    assert peers.max_error(torch.full_like(ref, math.nan), ref) == math.inf


# ---------------------------------------------------------------- peers against the reference (CPU)


@pytest.mark.parametrize("batch, context, q_len", [(2, 64, 1), (1, 64, 1), (1, 48, 16), (2, 32, 32), (2, 0, 32)])
def test_eager_flex_reads_the_pages_through_the_table(batch, context, q_len):
    cache, q, table = problem(batch, context, q_len)
    peer = peers.flex_peer(cache, q, q_len, table, 16, compiled=False)
    assert peer.paged
    assert peers.max_error(peer.output(), ours(cache, q, q_len, table)) < 1e-4
    if batch > 1 or q_len > 1:  # (one decoded sequence is the same over its pages in any order)
        # Another block table holds other sequences: the result must change with the table.
        other = torch.roll(table.flatten(), 1).view_as(table)
        assert peers.max_error(peer.output(), ours(cache, q, q_len, other)) > 0.1


def test_eager_flex_decode_masks_a_partial_last_page():
    cache, q, table = problem(2, 64, 1)
    cache.seq_lens = torch.tensor([37, 64], dtype=torch.int32)
    peer = peers.flex_peer(cache, q, 1, table, 16, compiled=False)
    assert peers.max_error(peer.output(), ours(cache, q, 1, table)) < 1e-4


@pytest.mark.parametrize("batch, context, q_len", [(2, 64, 1), (2, 0, 32), (2, 48, 16)])
def test_sdpa_views_match_the_contiguous_reference(batch, context, q_len):
    cache, q, _ = problem(batch, context, q_len)
    peer = peers.sdpa_peer(cache, q, q_len, SDPBackend.MATH)
    assert not peer.paged and peer.config.startswith("enable_gqa")
    assert ("causal_lower_right" in peer.config) == (q_len > 1 and context > 0)
    assert peers.max_error(peer.output(), ours(cache, q, q_len, None)) < 1e-4


# ---------------------------------------------------------------- unavailable peers


def test_a_missing_flashinfer_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    cache, q, table = problem(1, 32, 1)
    for name in ("flashinfer", "flashinfer_fa2"):
        with pytest.raises(peers.PeerUnavailable, match="flashinfer is not importable"):
            peers.build(name, cache, q, 1, table)


def test_cudnn_refuses_a_chunk_after_context():
    cache, q, table = problem(1, 32, 16)
    with pytest.raises(peers.PeerUnavailable, match="context-0 prefills only"):
        peers.build("sdpa_cudnn", cache, q, 16, table)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU has no cuDNN attention")
def test_a_backend_that_is_absent_is_a_reason():
    cache, q, table = problem(1, 32, 1)
    with pytest.raises(peers.PeerUnavailable, match="SDPA CUDNN_ATTENTION refused"):
        peers.build("sdpa_cudnn", cache, q, 1, table)


def test_out_of_memory_is_a_reason(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(peers, "sdpa_peer", oom)
    cache, q, table = problem(1, 32, 1)
    with pytest.raises(peers.PeerUnavailable, match="out of memory"):
        peers.build("sdpa_flash", cache, q, 1, table)


def test_unknown_peer_names():
    cache, q, table = problem(1, 32, 1)
    with pytest.raises(ValueError, match="unknown peer"):
        peers.build("xformers", cache, q, 1, table)
    assert bench.parse_args(["--peers", "all"]).peers == peers.PEERS
    assert bench.parse_args(["--peers", "flex,sdpa_flash"]).peers == ("flex", "sdpa_flash")
    assert bench.parse_args(["--peers", "none"]).peers == () == bench.parse_args([]).peers
    with pytest.raises(SystemExit):
        bench.parse_args(["--peers", "flex,xformers"])


# ---------------------------------------------------------------- the bench's peer rows (CPU, fakes)


class FakePeers:
    """Stands in for ``peers.build``: flashinfer right (times 8 us, 7 in a graph), flex wrong,
    sdpa_flash unavailable, sdpa_cudnn crashing."""

    def __init__(self):
        self.good: list = []

    def __call__(self, name, cache, q, q_len, table, block_size=16):
        assert block_size == 16
        if name == "flashinfer":
            out = ours(cache, q, q_len, table)
            call = lambda: out  # noqa: E731
            self.good.append(call)
            return peers.Peer(name, call, lambda o: o, paged=True, config="fake")
        if name == "flex":
            return peers.Peer(name, lambda: torch.zeros_like(q), lambda o: o, paged=True)
        if name == "sdpa_flash":
            raise peers.PeerUnavailable("no flash here")
        raise RuntimeError("boom")


@pytest.fixture
def fake_bench(monkeypatch):
    """Our kernels replaced by the reference, peers by ``FakePeers``; time_us gives ours 10
    (contiguous), 12 (paged 16) and 30 (SDPA) per pass, graph_us 9 and 11, eager_us 50, and 20 for our
    call repeated through ``repeatable``."""
    fake = FakePeers()
    monkeypatch.setattr(bench.triton_ops, "decode_attention", reference.decode_attention)
    monkeypatch.setattr(bench.triton_ops, "prefill_attention", reference.prefill_attention)
    monkeypatch.setattr(bench.peers, "build", fake)

    def cycling(values):
        state = {"i": 0}

        def timer(fn, *args):
            if any(fn is good for good in fake.good):
                return {"time": 8.0, "graph": 7.0, "host": 100.0}[values]
            seq = {"time": [10.0, 12.0, 30.0], "graph": [9.0, 11.0], "host": [50.0]}[values]
            state["i"] += 1
            return seq[(state["i"] - 1) % len(seq)]
        return timer

    monkeypatch.setattr(bench, "time_us", cycling("time"))
    monkeypatch.setattr(bench, "graph_us", cycling("graph"))
    host = cycling("host")
    repeated = set()
    real_repeated = bench._repeated

    def repeated_call(*args):
        call = real_repeated(*args)
        repeated.add(call)
        return call

    monkeypatch.setattr(bench, "_repeated", repeated_call)
    monkeypatch.setattr(bench, "eager_us", lambda fn, *args: 20.0 if fn in repeated else host(fn, *args))
    return fake


def test_decode_rows_put_peers_beside_ours(fake_bench):
    plan = dataclasses.replace(bench.QUICK, block_sizes=(16,), long_context=4096, decode_cases=((2, 64),),
                               decode_passes=3, peers=peers.PEERS[:1] + ("flex", "sdpa_flash", "sdpa_cudnn"),
                               graph_calls=20, host_cases=((2, 64),))
    rows = list(bench.decode_rows(plan, PEAKS, torch.float32, CPU))
    by_name = {r.addressing: r for r in rows}
    assert [r.addressing for r in rows] == ["contiguous", "paged", "sdpa", "flashinfer", "flex", "sdpa_flash", "sdpa_cudnn"]
    assert by_name["contiguous"].time_us == 10.0 and by_name["paged"].time_us == 12.0
    assert by_name["contiguous"].graph_us == 9.0 and by_name["paged"].graph_us == 11.0
    good = by_name["flashinfer"]
    assert (good.peer_status, good.config, good.block_size) == ("ok", "fake", 16)
    assert good.time_us == 8.0 and good.time_us_passes == "8.000;8.000;8.000"
    assert good.ratio_to_ours == pytest.approx(0.8)  # 8 us over our best, contiguous at 10
    assert good.graph_us == 7.0 and good.host_us == 100.0 and by_name["paged"].host_us == 50.0
    assert by_name["paged"].host_us_passes == "50.000;50.000;50.000"  # the host cost too: a median of 3 passes
    # Ours also repeated through triton_ops.repeatable, as the engines' later layers call it; peers are not.
    assert by_name["paged"].host_repeat_us == 20.0 and by_name["contiguous"].host_repeat_us == 20.0
    assert math.isnan(good.host_repeat_us) and math.isnan(by_name["sdpa"].host_repeat_us)
    assert by_name["flex"].peer_status.startswith("mismatch") and math.isnan(by_name["flex"].time_us)
    assert by_name["sdpa_flash"].peer_status == "unavailable: no flash here" and by_name["sdpa_flash"].block_size == 0
    assert by_name["sdpa_cudnn"].peer_status == "failed: RuntimeError: boom"
    assert all(not r.peer_status and math.isnan(r.ratio_to_ours) for r in rows[:3])

    text = bench.summary(rows, PEAKS)
    assert "    2     64     12.0     10.0     11.0      9.0      flashinfer      8.0   0.80      flashinfer      7.0   0.78" in text
    assert "decode vs fastest peer: worst x 0.78 at b2 ctx64 (flashinfer, graph) (>= 1.00, graph replay)" in text
    assert "eager host us/call b2 ctx64: contiguous 50.0, paged 50.0, flashinfer 100.0; paged/contiguous 1.00" in text
    assert "  repeated (triton_ops.repeatable, as in the engines' layers after the first): contiguous 20.0, paged 20.0; " \
           "paged/contiguous 1.00" in text
    assert "decode sdpa_flash: unavailable: no flash here [b2 ctx64]" in text


def test_peers_section_uses_every_peer_and_block_size_16(fake_bench):
    plan = dataclasses.replace(bench.QUICK, batches=(2,), contexts=(64,), long_context=4096, prefills=((1, 32),),
                               chunked=((2, 32, 16),), decode_passes=2, graph_calls=20, host_cases=((2, 64),))
    rows = list(bench.peer_rows(plan, PEAKS, torch.float32, CPU))
    decode = [r for r in rows if r.kernel == "decode"]
    prefill = [r for r in rows if r.kernel == "prefill"]
    assert {r.batch for r in decode} == {1, 2}  # the grid's case and the long one (no host case beyond)
    assert [r.addressing for r in decode[:3]] == ["contiguous", "paged", "sdpa"] and decode[1].block_size == 16
    for kernel_rows in (decode, prefill):
        assert {r.addressing for r in kernel_rows if r.peer_status} == set(peers.PEERS)
    # The sdpa_flash peer replaces the context-0 SDPA flash row; prefill runs decode's passes.
    assert [r.addressing for r in prefill if r.context == 0].count("sdpa_flash") == 1
    ok = [r for r in prefill if r.peer_status == "ok"]
    assert {(r.context, r.time_us) for r in ok} == {(0, 8.0), (32, 8.0)}
    assert all(len(r.time_us_passes.split(";")) == 2 for r in prefill if not math.isnan(r.time_us))
    flops = bench.causal_flops(2, 32, 16)
    chunked = next(r for r in ok if r.context == 32)
    assert chunked.flops_frac == pytest.approx(flops / 8e-6 / PEAKS.bf16_flops_per_s)
    assert "peers, prefill" in bench.summary(rows, PEAKS)


def test_csv_keeps_the_peer_columns(tmp_path):
    log = bench.CsvLog(tmp_path / "kernels_bench.csv", {"gpu": "Fake GPU"})
    log.add(Row("decode", "flashinfer", 16, 1, 512, 1, 0, 9.0, 10**6, 0.0, 0.5, 0.0, "fake",
                peer_status="ok", graph_us=8.5, host_us=30.0, ratio_to_ours=1.1))
    log.add(Row("decode", "paged", 16, 1, 512, 1, 4, 8.0, 10**6, 0.0, 0.5, 0.0))
    log.fh.close()
    with (tmp_path / "kernels_bench.csv").open() as fh:
        peer, mine = list(csv.DictReader(fh))
    assert (peer["peer_status"], float(peer["graph_us"]), float(peer["ratio_to_ours"])) == ("ok", 8.5, 1.1)
    assert mine["peer_status"] == "" and math.isnan(float(mine["ratio_to_ours"]))


# ---------------------------------------------------------------- GPU


GPU_CASES = {
    # name: (batch, context, q_len, ragged lengths for a decode or None)
    "decode": (4, 512, 1, None),
    "decode_ragged": (4, 512, 1, [200, 512, 37, 496]),
    "prefill": (2, 0, 256, None),
    "chunk_after_context": (2, 256, 128, None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("name", peers.PEERS)
def test_gpu_peer_matches_ours(name, case):
    """Every peer against our Triton kernels on the same inputs; cuDNN may refuse (a skip),
    flashinfer may be missing (a skip), the others must run."""
    from kernels import triton_ops

    if name.startswith("flashinfer"):
        pytest.importorskip("flashinfer")
    batch, context, q_len, ragged = GPU_CASES[case]
    if ragged and name not in peers.PAGED_PEERS:
        pytest.skip("the dense peers read whole regions")
    cache, q, table = problem(batch, context, q_len, torch.device("cuda"), torch.bfloat16)
    if ragged:
        cache.seq_lens = torch.tensor(ragged, dtype=torch.int32, device="cuda")
    try:
        peer = peers.build(name, cache, q, q_len, table)
    except peers.PeerUnavailable as exc:
        if name == "sdpa_cudnn":
            pytest.skip(str(exc))
        raise
    expected = ours(cache, q, q_len, table if peer.paged else None, kernels=triton_ops)
    err = peers.max_error(peer.output(), expected)
    print(f"{name} {case} ({peer.config}): max error {err:.2e}")
    assert err <= peers.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_peers_section_writes_a_row_for_every_peer(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "kernels.bench", "--sections", "peers", "--quick", "--out", str(out)],
                   cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=1800)
    with (out / "kernels_bench.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for kernel in ("decode", "prefill"):
        got = {r["addressing"]: r for r in rows if r["kernel"] == kernel and r["peer_status"]}
        assert set(got) == set(peers.PEERS)
        for r in got.values():
            assert r["peer_status"] == "ok" or ":" in r["peer_status"]  # ok, or a reason
    ok = [r for r in rows if r["peer_status"] == "ok"]
    assert ok and all(math.isfinite(float(r["time_us"])) for r in ok)
    assert any(math.isfinite(float(r["host_us"])) for r in rows if r["peer_status"] == "ok")
