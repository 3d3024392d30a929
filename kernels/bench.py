"""Benchmark of the Triton kernels: ``python -m kernels.bench [--out DIR] [--quick] [--sections ...]``.

Measures the device's peaks (``kernels.device_peaks``), then each kernel's median time
(``triton.testing.do_bench``, L2 flushed before every run) and its achieved bandwidth:
the bytes it must read (every context token's K and V once) over its time. Decode runs
paged at several block sizes and contiguous over the same cache memory, so their ratio is
the price of paging; torch SDPA over contiguous tensors is the outside reference, and for
prefill its flash backend. The ``layers`` section times the decoder's elementwise layers
(RMSNorm, the residual add with its norm, SwiGLU's activation, rotary embedding) at decode and
prefill token counts of two presets, fused Triton against the eager torch reference. The ``peers``
section times other libraries' attention (``kernels.peers``: FlashInfer, FlexAttention, SDPA flash
and cuDNN) beside ours over the decode and prefill grids, after checking each one's output against
ours; ``--peers`` adds them to the decode and prefill sections too. Writes CSV under ``--out`` and
prints a short summary last.

Decode times every variant of a case in turn, ``--passes`` times over (default 3), and reports
each variant's median over the passes, so that paged / contiguous ratios of 10-20 µs kernels,
where one pass moves by up to 5%, are not left to a single pass. The CSV keeps the passes'
times in ``time_us_passes`` (``;``-separated, in pass order) and their count in
``decode_passes``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.metadata
import math
import platform
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import peers, reference, triton_cache, triton_ops
from kernels.device_peaks import DevicePeaks, device_peaks
from kernels.triton_decode import DecodeConfig, decode, decode_config, num_kv_splits
from kernels.triton_prefill import PrefillConfig, prefill
from kernels.triton_common import sm_count

# llama-3.1-8b attention: 32 query heads, 8 KV heads, head dim 128.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


@dataclass
class Row:
    kernel: str
    addressing: str
    block_size: int
    batch: int
    context: int
    q_len: int
    splits: int
    time_us: float
    bytes_read: int
    gbps: float
    bw_frac: float
    tflops: float
    config: str = ""
    # Decode: each pass's time (µs, ';'-separated, in pass order); time_us is their median.
    time_us_passes: str = ""
    # Peers (kernels.peers): "ok", "mismatch: ..." or why it did not run (then time_us is NaN); ours: "".
    peer_status: str = ""
    # Decode with --peers: per call of Plan.graph_calls calls captured in one CUDA graph (median of replays).
    graph_us: float = math.nan
    # Eager wall time per call at Plan.host_cases: at small batch, the host's launch cost (the median of
    # Plan.decode_passes interleaved passes of 200 calls, each pass's in host_us_passes).
    host_us: float = math.nan
    host_us_passes: str = ""
    # Ours, at Plan.host_cases: the same, for the call repeated through ``triton_ops.repeatable`` (recorded once,
    # launched again through the compiled kernels, into the recorded output), as the engines' piecewise steps run
    # attention in every layer after the first; FlashInfer's host_us is likewise its ``run()`` after one ``plan()``.
    host_repeat_us: float = math.nan
    # Peers: time_us over our best (fastest of our paged and contiguous) in the same case; > 1: ours is faster.
    ratio_to_ours: float = math.nan
    # Prefill: achieved share of the measured bf16 matmul peak F.
    flops_frac: float = math.nan


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    block_sizes: tuple[int, ...]
    long_context: int
    prefills: tuple[tuple[int, int], ...]  # (batch, length) of full causal prefills
    chunked: tuple[tuple[int, int, int], ...]  # (batch, context before, chunk)
    rep_ms: int
    # (batch, context) decode cases to run instead of the batches x contexts grid (and the long one).
    decode_cases: tuple[tuple[int, int], ...] = ()
    # Interleaved passes over each decode case's variants; rows report the median.
    decode_passes: int = 3
    # Peers (kernels.peers.PEERS) timed beside ours in the decode and prefill cases.
    peers: tuple[str, ...] = ()
    # With peers: each decode variant also as this many calls in one CUDA graph (graph_us); 0: not.
    graph_calls: int = 0
    # Decode cases (added to the grid) whose variants' eager host cost per call is measured (host_us).
    host_cases: tuple[tuple[int, int], ...] = ()
    # Interleaved passes over each prefill case's variants.
    prefill_passes: int = 1


FULL = Plan((1, 4, 16, 64, 256), (512, 2048, 4096, 16384), (1, 16, 256), 32768,
            ((1, 4096), (1, 16384), (4, 2048), (16, 1024)), ((4, 4096, 512), (1, 16384, 2048)), 200)
# Shapes the tune section sweeps: the targets' decode shapes and one long prefill.
TUNE_DECODE = ((64, 4096), (1, 32768), (4, 4096))
TUNE_PREFILL_LENGTH = 8192
QUICK = Plan((1, 64), (512, 4096), (1, 16), 32768, ((1, 4096),), ((4, 4096, 512),), 50)


# The peers section: calls per CUDA graph in decode's graph timing, the decode cases where eager
# host costs are taken, and the block size of the paged peers (and of our paged kernel they face).
GRAPH_CALLS = 20
HOST_CASES = ((1, 4096), (8, 4096))
PEER_BLOCK_SIZE = 16


def capture(fn: Callable[[], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn``, after one call on the current stream (compiles,
    JIT builds) and one on a side stream (lazy initialisation stays out of the capture)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_us(fn: Callable[[], object], rep_ms: int) -> float:
    """Median time of ``fn`` replayed from a CUDA graph, L2 flushed before each run: the kernels'
    cost as the engine pays it (decode runs under graphs), without Python launch overhead,
    which would otherwise dominate small problems."""
    graph = capture(fn)
    return triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def graph_us(fn: Callable[[], object], calls: int, replays: int = 10) -> float:
    """Time per call of ``calls`` back-to-back calls captured in one CUDA graph, from CUDA events
    around each replay (median of ``replays``): decode as a captured step runs it, call after
    call with nothing between. Unlike ``time_us`` nothing flushes L2, so a cache that fits in L2
    is read from it after the first call; every variant of a case is timed the same way."""
    graph = capture(fn, calls)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def interleaved(timers: dict[object, Callable[[], float]], passes: int) -> dict[object, list[float]]:
    """Each timer's results over ``passes`` passes, a pass calling every timer once in turn
    (pass 1: all of them, then pass 2: all of them, ...), so that a slow or fast spell of the
    device lands on every variant of a case rather than on one."""
    times: dict[object, list[float]] = {key: [] for key in timers}
    for _ in range(passes):
        for key, timer in timers.items():
            times[key].append(timer())
    return times


def median_us(times: list[float]) -> float:
    """Median of the passes' times; NaN if any pass is NaN (a variant that could not run)."""
    return math.nan if not times or any(math.isnan(t) for t in times) else statistics.median(times)


def format_passes(times: list[float]) -> str:
    return ";".join(f"{t:.3f}" for t in times)


def eager_us(fn: Callable[[], object], iters: int = 200) -> float:
    """Wall time per call of ``fn`` called back to back, no graph: at small problems, what the
    host's launch path (Python, the driver) costs, which graph replay hides."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def kv_bytes(tokens: int, dtype: torch.dtype) -> int:
    """Bytes of K and V that attention over ``tokens`` context tokens must read."""
    return 2 * tokens * KV_HEADS * HEAD_DIM * torch.tensor([], dtype=dtype).element_size()


def causal_flops(batch: int, context: int, q_len: int) -> float:
    """QK^T and PV multiply-adds of the last ``q_len`` queries over ``context + q_len`` keys, causal."""
    pairs = q_len * context + q_len * (q_len + 1) / 2
    return 4.0 * batch * HEADS * HEAD_DIM * pairs


class Cache:
    """One layer's cache holding ``batch`` sequences of ``length`` tokens, with both addressings:
    a shuffled block table (paged) and one region per sequence (contiguous)."""

    def __init__(self, batch: int, length: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.batch, self.length = batch, length
        gen = torch.Generator(device=device).manual_seed(seed)
        slots = batch * length
        self.k = torch.randn(slots, KV_HEADS, HEAD_DIM, dtype=dtype, device=device, generator=gen)
        self.v = torch.randn(slots, KV_HEADS, HEAD_DIM, dtype=dtype, device=device, generator=gen)
        self.seq_starts = torch.arange(batch, dtype=torch.int32, device=device) * length
        self.seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
        self.device = device

    def block_table(self, block_size: int) -> torch.Tensor:
        per_seq = self.length // block_size
        perm = torch.randperm(self.batch * per_seq, device=self.device, dtype=torch.int64)
        return perm.to(torch.int32).view(self.batch, per_seq)

    def addressing(self, block_size: int) -> dict:
        if block_size == 0:
            return {"seq_starts": self.seq_starts}
        return {"block_tables": self.block_table(block_size), "block_size": block_size}


Key = tuple[str, str, int, int]  # (kernel, addressing, block size, splits): one row of a case


@dataclass
class Variant:
    """One attention call that a case times, ours or a peer's, and the context its calls run in."""

    fn: Callable[[], object] | None  # None: a peer that is not timed (``status`` says why)
    context: Callable[[], ContextManager] = contextlib.nullcontext
    status: str = ""  # peers: "ok", or why not; ours: ""
    config: str = ""


def measured(variant: Variant, measure: Callable[[Callable[[], object]], float], what: str) -> Callable[[], float]:
    """A timer: ``measure(variant.fn)`` inside the variant's context. A peer that fails there (it
    cannot be captured in a CUDA graph, it runs out of memory) gets NaN, and the reason joins its
    status; ours raises."""
    def timer() -> float:
        with variant.context():
            if not variant.status:
                return measure(variant.fn)
            try:
                return measure(variant.fn)
            except Exception as exc:
                note = f"{what}: {peers.reason(exc)}"
                if note not in variant.status:
                    variant.status += f"; {note}"
                return math.nan
    return timer


def peer_variants(plan: Plan, cache: Cache, q: torch.Tensor, q_len: int, table: torch.Tensor,
                  ours: dict[bool, torch.Tensor], kernel: str) -> dict[Key, Variant]:
    """The plan's peers set up for this case, each checked against our output on the same inputs
    (``ours[paged]``: paged peers against our paged kernel over the same block table, dense ones
    against our contiguous kernel). One that is unavailable, fails or disagrees is not timed."""
    found: dict[Key, Variant] = {}
    for name in plan.peers:
        key = (kernel, name, PEER_BLOCK_SIZE if name in peers.PAGED_PEERS else 0, 0)
        try:
            peer = peers.build(name, cache, q, q_len, table, PEER_BLOCK_SIZE)
            err = peers.max_error(peer.output(), ours[peer.paged])
        except peers.PeerUnavailable as exc:
            found[key] = Variant(None, status=f"unavailable: {exc}")
        except Exception as exc:  # a peer's failure is its row's, not the run's
            found[key] = Variant(None, status=f"failed: {peers.reason(exc)}")
        else:
            ok = err <= peers.TOLERANCE[q.dtype]
            found[key] = Variant(peer.call if ok else None, peer.context,
                                 "ok" if ok else f"mismatch: max error {err:.3g} of max |ours|", peer.config)
        if found[key].fn is None and q.is_cuda:
            torch.cuda.empty_cache()
    return found


def _ours_best(times: dict[object, float], kernel: str) -> float:
    """Our fastest time in a case (paged at any block size or contiguous), NaN if none ran."""
    ours = [t for key, t in times.items() if len(key) == 4 and key[0] == kernel
            and key[1] in ("paged", "contiguous") and not math.isnan(t)]
    return min(ours, default=math.nan)


def decode_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """Paged (each block size) and contiguous decode over one cache per (batch, context), plus SDPA
    (and, at the long context, paged decode without split-KV). A case's variants are timed in turn,
    ``plan.decode_passes`` times over; each row holds its variant's median and every pass's time.
    With ``plan.peers``, each peer joins the passes once its output matched ours, and every
    variant of ours and theirs is also timed as ``plan.graph_calls`` calls in one CUDA graph;
    at ``plan.host_cases`` (added to the cases) each one's eager host cost per call is measured."""
    cases = list(plan.decode_cases) or [(b, c) for b in plan.batches for c in plan.contexts] + [(1, plan.long_context)]
    cases += [case for case in plan.host_cases if case not in cases]
    for batch, context in cases:
        cache = Cache(batch, context, dtype, device)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
        nbytes = kv_bytes(batch * context, dtype)
        splits = num_kv_splits(batch, KV_HEADS, context, sm_count(device), decode_config(HEAD_DIM, dtype, device))
        addrs = {block_size: cache.addressing(block_size) for block_size in (0, *plan.block_sizes)}
        ours = lambda addr: triton_ops.decode_attention(  # noqa: E731
            q, cache.k, cache.v, cache.seq_lens, max_seq_len=context, validate=False, **addr)
        # (kernel, addressing, block size, splits) -> our variants.
        variants: dict[Key, Variant] = {("decode", "paged" if bs else "contiguous", bs, splits):
                                        Variant(lambda addr=addr: ours(addr)) for bs, addr in addrs.items()}
        timers: dict[object, Callable[[], float]] = {
            key: measured(v, lambda fn: time_us(fn, plan.rep_ms), "time") for key, v in variants.items()}
        if context == plan.long_context:
            timers[("decode_nosplit", "paged", 16, 1)] = _unsplit_timer(cache, q, context, plan)
        timers[("decode", "sdpa", 0, 0)] = _sdpa_decode_timer(cache, q, plan)
        order = list(timers)  # ours, then the no-split and SDPA rows, then the peers
        if plan.peers:
            paged = addrs.get(PEER_BLOCK_SIZE) or cache.addressing(PEER_BLOCK_SIZE)
            found = peer_variants(plan, cache, q, 1, paged["block_tables"],
                                  {False: ours(addrs[0]), True: ours(paged)}, "decode")
            timers |= {key: measured(v, lambda fn: time_us(fn, plan.rep_ms), "time") for key, v in found.items() if v.fn}
            variants |= found
            order += list(found)
            if plan.graph_calls:
                timers |= {(*key, "graph"): measured(v, lambda fn: graph_us(fn, plan.graph_calls), "graph")
                           for key, v in variants.items() if v.fn}
        times = interleaved(timers, plan.decode_passes)
        host_times = (interleaved({key: measured(v, eager_us, "host") for key, v in variants.items() if v.fn},
                                  plan.decode_passes) if (batch, context) in plan.host_cases else {})
        host = {key: median_us(t) for key, t in host_times.items()}
        repeat_times = (interleaved({key: (lambda addr=addrs[key[2]]: eager_us(_repeated(cache, q, context, addr)))
                                     for key in variants if key[0] == "decode" and key[1] in ("paged", "contiguous")},
                                    plan.decode_passes) if (batch, context) in plan.host_cases else {})
        medians = {key: median_us(t) for key, t in times.items()}
        best = _ours_best(medians, "decode")
        for key in order:
            kernel, addressing, block_size, n_splits = key
            t, v = medians.get(key, math.nan), variants.get(key, Variant(None))
            yield Row(kernel, addressing, block_size, batch, context, 1, n_splits, t, nbytes, nbytes / t / 1e3,
                      nbytes / (t * 1e-6) / peaks.read_bw_bytes_per_s, 0.0, v.config,
                      time_us_passes=format_passes(times.get(key, [])), peer_status=v.status,
                      graph_us=medians.get((*key, "graph"), math.nan), host_us=host.get(key, math.nan),
                      host_us_passes=format_passes(host_times.get(key, [])),
                      host_repeat_us=median_us(repeat_times[key]) if key in repeat_times else math.nan,
                      ratio_to_ours=t / best if v.status else math.nan)
        del cache, timers, variants


def _repeated(cache: Cache, q: torch.Tensor, context: int, addr: dict) -> Callable[[], None]:
    """Our decode call over ``addr`` as a repeater launches it again (``Row.host_repeat_us``)."""
    out = torch.empty_like(q)
    again = triton_ops.repeatable(lambda k, v: triton_ops.decode_attention(
        q, k, v, cache.seq_lens, max_seq_len=context, validate=False, out=out, **addr), cache.k, cache.v)
    return lambda: again(cache.k, cache.v)


def _unsplit_timer(cache: Cache, q: torch.Tensor, context: int, plan: Plan) -> Callable[[], float]:
    """The same long decode without split-KV: what the split buys at batch 1."""
    table = cache.block_table(16)
    fn = lambda: decode(q, cache.k, cache.v, cache.seq_lens, table, paged=True, block_size=16,  # noqa: E731
                        scale=HEAD_DIM**-0.5, max_seq_len=context, num_splits=1)
    return lambda: time_us(fn, plan.rep_ms)


def _sdpa_decode_timer(cache: Cache, q: torch.Tensor, plan: Plan) -> Callable[[], float]:
    """SDPA (default backend choice) reading the contiguous cache through a [B, Hkv, L, D] view."""
    b, length = cache.batch, cache.length
    k = cache.k.view(b, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = cache.v.view(b, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q4 = q.view(b, HEADS, 1, HEAD_DIM)

    def timer() -> float:
        try:
            return time_us(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), plan.rep_ms)
        except torch.OutOfMemoryError:  # a backend that expands K/V to every query head
            return math.nan
    return timer


def prefill_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """Causal prefill over the cache (paged 16 and contiguous) against SDPA flash on the same problem
    (context 0), and ``plan.peers`` after a check against our output, ``plan.prefill_passes``
    interleaved passes over the variants."""
    cases = [(b, 0, n) for b, n in plan.prefills] + list(plan.chunked)
    for batch, context, chunk in cases:
        total = context + chunk
        cache = Cache(batch, total, dtype, device)
        q = torch.randn(batch * chunk, HEADS, HEAD_DIM, dtype=dtype, device=device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * chunk
        flops = causal_flops(batch, context, chunk)
        nbytes = kv_bytes(batch * total, dtype)
        addrs = {block_size: cache.addressing(block_size) for block_size in (0, PEER_BLOCK_SIZE)}
        ours = lambda addr: triton_ops.prefill_attention(  # noqa: E731
            q, cache.k, cache.v, qsl, cache.seq_lens, max_query_len=chunk, validate=False, **addr)
        variants: dict[Key, Variant] = {("prefill", "paged" if bs else "contiguous", bs, 0):
                                        Variant(lambda addr=addr: ours(addr)) for bs, addr in addrs.items()}
        if context == 0 and "sdpa_flash" not in plan.peers:  # the peer replaces it
            variants[("prefill", "sdpa_flash", 0, 0)] = _sdpa_prefill_variant(cache, q)
        if plan.peers:
            variants |= peer_variants(plan, cache, q, chunk, addrs[PEER_BLOCK_SIZE]["block_tables"],
                                      {False: ours(addrs[0]), True: ours(addrs[PEER_BLOCK_SIZE])}, "prefill")
        timers = {key: measured(v, lambda fn: time_us(fn, plan.rep_ms), "time") for key, v in variants.items() if v.fn}
        times = interleaved(timers, plan.prefill_passes)
        medians = {key: median_us(t) for key, t in times.items()}
        best = _ours_best(medians, "prefill")
        for key, v in variants.items():
            _, addressing, block_size, _ = key
            t = medians.get(key, math.nan)
            yield Row("prefill", addressing, block_size, batch, context, chunk, 0, t, nbytes, nbytes / t / 1e3,
                      nbytes / (t * 1e-6) / peaks.read_bw_bytes_per_s, flops / t / 1e6, v.config,
                      time_us_passes=format_passes(times.get(key, [])) if plan.prefill_passes > 1 else "",
                      peer_status=v.status, ratio_to_ours=t / best if v.status else math.nan,
                      flops_frac=flops / (t * 1e-6) / peaks.bf16_flops_per_s)
        del cache, timers, variants


def _sdpa_prefill_variant(cache: Cache, q: torch.Tensor) -> Variant:
    """SDPA's flash backend on [B, L, H, D] tensors (its native layout), K/V expanded to every query head."""
    b, n = cache.batch, cache.length
    group = HEADS // KV_HEADS
    k = cache.k.view(b, n, KV_HEADS, HEAD_DIM).repeat_interleave(group, dim=2).transpose(1, 2)
    v = cache.v.view(b, n, KV_HEADS, HEAD_DIM).repeat_interleave(group, dim=2).transpose(1, 2)
    q4 = q.view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
    return Variant(lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True),
                   lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))


def peer_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """Ours (paged at block size 16, contiguous) beside the peers (all of ``kernels.peers.PEERS``
    unless ``--peers`` names some) over the decode and prefill grids, in the same interleaved
    passes; decode also as CUDA-graph replay and, at ``HOST_CASES``, as eager host cost per call."""
    plan = dataclasses.replace(plan, block_sizes=(PEER_BLOCK_SIZE,), peers=plan.peers or peers.PEERS,
                               host_cases=plan.host_cases or HOST_CASES,
                               prefill_passes=max(plan.prefill_passes, plan.decode_passes))
    yield from decode_rows(plan, peaks, dtype, device)
    yield from prefill_rows(plan, peaks, dtype, device)


def cache_op_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """write_kv of a 4096-token step and copy_blocks of 64 blocks across 32 layers (bytes moved: read + write)."""
    tokens, slots = 4096, 1 << 20
    k_cache = torch.empty(slots, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    value = torch.randn_like(key)
    slot_mapping = torch.randperm(slots, device=device)[:tokens]
    t = time_us(lambda: triton_ops.write_kv(key, value, k_cache, v_cache, slot_mapping, validate=False), plan.rep_ms)
    moved = 2 * kv_bytes(tokens, dtype)
    yield Row("write_kv", "slots", 1, tokens, 0, 0, 0, t, moved, moved / t / 1e3, moved / (t * 1e-6) / peaks.read_bw_bytes_per_s, 0.0)
    del k_cache, v_cache
    layers, block_size, pairs = 32, 16, 64
    whole = torch.randn(layers, 2, 4096 * block_size, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    src, dst = torch.arange(pairs, device=device), torch.arange(pairs, 2 * pairs, device=device)
    # The kernel alone: the public copy_blocks first checks the block lists on the host (syncs).
    t = time_us(lambda: triton_cache.copy_blocks(whole, whole, src, dst, block_size), plan.rep_ms)
    moved = 2 * layers * pairs * block_size * kv_bytes(1, dtype)
    yield Row("copy_blocks", "blocks", block_size, pairs, 0, 0, 0, t, moved, moved / t / 1e3, moved / (t * 1e-6) / peaks.read_bw_bytes_per_s, 0.0)


def tune_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """Sweep tile configs and split counts on the target shapes, paged (16) and contiguous;
    every candidate is checked against the default config first."""
    for batch, context in TUNE_DECODE:
        cache = Cache(batch, context, dtype, device)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
        nbytes = kv_bytes(batch * context, dtype)
        for block_size in (16, 0):
            addr = cache.block_table(16) if block_size else cache.seq_starts
            run = lambda cfg: decode(q, cache.k, cache.v, cache.seq_lens, addr, paged=block_size > 0,  # noqa: E731
                                     block_size=16, scale=HEAD_DIM**-0.5, max_seq_len=context, config=cfg)
            expected = run(None)
            for cfg in _decode_candidates(batch):
                t = _checked_time(lambda: run(cfg), expected, plan)
                splits = num_kv_splits(batch, KV_HEADS, context, sm_count(device), cfg)
                yield Row("tune_decode", "paged" if block_size else "contiguous", block_size, batch, context, 1,
                          splits, t, nbytes, nbytes / t / 1e3, nbytes / (t * 1e-6) / peaks.read_bw_bytes_per_s,
                          0.0, _describe(cfg))
        del cache
    batch, length = 1, TUNE_PREFILL_LENGTH
    cache = Cache(batch, length, dtype, device)
    q = torch.randn(length, HEADS, HEAD_DIM, dtype=dtype, device=device)
    qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
    flops = causal_flops(batch, 0, length)
    for block_size in (16, 0):
        addr = cache.block_table(16) if block_size else cache.seq_starts
        run = lambda cfg: prefill(q, cache.k, cache.v, qsl, cache.seq_lens, addr, paged=block_size > 0,  # noqa: E731
                                  block_size=16, scale=HEAD_DIM**-0.5, max_query_len=length, config=cfg)
        expected = run(None)
        for cfg in _prefill_candidates():
            t = _checked_time(lambda: run(cfg), expected, plan)
            yield Row("tune_prefill", "paged" if block_size else "contiguous", block_size, batch, 0, length, 0, t,
                      0, 0.0, 0.0, flops / t / 1e6, _describe(cfg))


@dataclass(frozen=True)
class LayerShape:
    """The shapes of a preset that its elementwise layers see."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool


LAYER_SHAPES = (LayerShape("qwen3-0.6b", 1024, 3072, 16, 8, 128, True),
                LayerShape("llama-3.1-8b", 4096, 14336, 32, 8, 128, False))
LAYER_TOKENS = (256, 8192)  # a decode batch and a prefill chunk
LAYER_OPS = ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding")
# The ops one decoder layer runs (the first layer's plain rms_norm aside).
PER_LAYER = {"add_rms_norm": 2, "rotary_embedding": 1, "silu_and_mul": 1}
_MAX_POSITIONS = 40960


def layer_problems(shape: LayerShape, tokens: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[tuple, int]]:
    """Arguments of each layer op at ``tokens`` tokens, and the bytes it must read and write.
    q and k are views of one fused qkv output, as the attention layer passes them."""
    size = torch.tensor([], dtype=dtype).element_size()
    t, h, inter, d = tokens, shape.hidden, shape.intermediate, shape.head_dim
    randn = lambda *dims: torch.randn(*dims, dtype=dtype, device=device)  # noqa: E731
    qkv = randn(t, (shape.heads + 2 * shape.kv_heads) * d)
    q, k, _ = qkv.split([shape.heads * d, shape.kv_heads * d, shape.kv_heads * d], dim=-1)
    norms = (1 + randn(d) / 4, 1 + randn(d) / 4) if shape.qk_norm else (None, None)
    positions = torch.randint(0, _MAX_POSITIONS, (t,), device=device)
    rope_bytes = 2 * t * (shape.heads + shape.kv_heads) * d * size + t * (d * size + 8) + (2 * d * size if shape.qk_norm else 0)
    return {
        "rms_norm": ((randn(t, h), 1 + randn(h) / 4, 1e-6), (2 * t * h + h) * size),
        "add_rms_norm": ((randn(t, h), randn(t, h), 1 + randn(h) / 4, 1e-6), (4 * t * h + h) * size),
        "silu_and_mul": ((randn(t, 2 * inter),), 3 * t * inter * size),
        "rotary_embedding": ((positions, q.view(t, shape.heads, d), k.view(t, shape.kv_heads, d),
                              randn(_MAX_POSITIONS, d), *norms, 1e-6), rope_bytes),
    }


def layer_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """Each layer op, fused Triton and the eager torch reference, replayed from a CUDA graph (the
    torch version's several launches are what a graph-captured decode step pays) and called
    eagerly (``<impl>-eager``: with the host's launch cost); the Triton result is checked
    against the reference's first. Rows: kernel = op, addressing = implementation, batch =
    tokens, config = preset."""
    for shape in LAYER_SHAPES:
        for tokens in LAYER_TOKENS:
            for op, (args, nbytes) in layer_problems(shape, tokens, dtype, device).items():
                expected = getattr(reference, op)(*args)
                for impl, module in (("triton", triton_ops), ("torch", reference)):
                    fn = lambda module=module: getattr(module, op)(*args)  # noqa: E731
                    for name, t in ((impl, _checked_time(fn, expected, plan)), (f"{impl}-eager", eager_us(fn))):
                        yield Row(op, name, 0, tokens, 0, 0, 0, t, nbytes, nbytes / t / 1e3,
                                  nbytes / (t * 1e-6) / peaks.read_bw_bytes_per_s, 0.0, shape.name)


def layer_summary(rows: list[Row]) -> list[str]:
    """Per preset and token count: each op's graph-replayed time, Triton vs torch (and eager
    times where measured), and one decoder layer's totals."""
    by_key = {(r.config, r.batch, r.kernel, r.addressing): r for r in rows if r.kernel in LAYER_OPS}
    lines = []
    for name, tokens in sorted({key[:2] for key in by_key}):
        total: dict[str, float] = {}
        for op in LAYER_OPS:
            got = {key[3]: r for key, r in by_key.items() if key[:3] == (name, tokens, op)}
            if "triton" not in got or "torch" not in got:
                continue
            ours, theirs = got["triton"], got["torch"]
            eager = (f"; eager triton {got['triton-eager'].time_us:.1f} us, torch {got['torch-eager'].time_us:.1f} us"
                     if "triton-eager" in got and "torch-eager" in got else "")
            lines.append(f"{name} T={tokens} {op}: triton {ours.time_us:.1f} us ({ours.gbps:,.0f} GB/s, "
                         f"{100 * ours.bw_frac:.0f}% of B), torch {theirs.time_us:.1f} us: "
                         f"{theirs.time_us / ours.time_us:.2f}x{eager}")
            for impl, r in got.items():
                total[impl] = total.get(impl, 0.0) + PER_LAYER.get(op, 0) * r.time_us
        lines.append(f"{name} T={tokens} per decoder layer (2 add_rms_norm + rotary + silu_and_mul): "
                     + ", ".join(f"{impl} {t:.1f} us" for impl, t in total.items()))
    return lines


def _decode_candidates(batch: int) -> list[DecodeConfig]:
    """Tiles at batch 64 (no split); split counts at small batches (no recompilation)."""
    if batch >= 64:
        return [DecodeConfig(n, 4, s) for n in (32, 64, 128) for s in (2, 3)]
    return [DecodeConfig(64, 4, 2, waves=w, min_tiles_per_split=m) for w in (1, 2, 3, 4, 8) for m in (2, 4, 8)]


def _prefill_candidates() -> list[PrefillConfig]:
    return [PrefillConfig(m, n, w, s) for m, n, w, s in (
        (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2))]


Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def _checked_time(fn: Callable[[], Outputs], expected: Outputs, plan: Plan) -> float:
    """Time of a candidate, or NaN when it fails to compile or disagrees with the expected output(s)."""
    try:
        out = fn()
    except Exception as exc:  # a config past the shared-memory limit fails to compile: skip it
        print(f"  candidate failed: {type(exc).__name__}: {str(exc)[:120]}")
        return math.nan
    pairs = zip(out, expected) if isinstance(out, tuple) else [(out, expected)]
    err = max(((o.float() - e.float()).norm() / e.float().norm()).item() for o, e in pairs)
    return time_us(fn, plan.rep_ms) if err < 1e-2 else math.nan


def _describe(cfg: object) -> str:
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg))


def _fastest(candidates: list[Row], field: str) -> Row | None:
    """The row with the smallest ``field`` that was measured, if any."""
    timed = [r for r in candidates if not math.isnan(getattr(r, field))]
    return min(timed, key=lambda r: getattr(r, field), default=None)


def peer_summary(rows: list[Row]) -> list[str]:
    """The issue's peer targets: per decode shape, ours (paged 16, contiguous) against the fastest
    peer whose output matched ours, as ``time_us`` and as graph replay (x = peer / our best: >= 1
    wanted everywhere); per prefill shape the same (x >= 0.90 wanted); eager host costs per
    call; and why any peer did not run."""
    theirs = [r for r in rows if r.peer_status]
    if not theirs:
        return []
    ours = {(r.kernel, r.batch, r.context, r.q_len, r.addressing): r for r in rows
            if not r.peer_status and r.kernel in ("decode", "prefill") and r.block_size in (0, PEER_BLOCK_SIZE)
            and r.addressing in ("paged", "contiguous")}
    lines: list[str] = []
    for kernel in ("decode", "prefill"):
        cases = sorted({(r.batch, r.context, r.q_len) for r in theirs if r.kernel == kernel})
        if not cases:
            continue
        if kernel == "decode":
            lines.append("peers, decode: us (g = per call in one CUDA graph of --graph-calls calls); x = fastest matching peer / our best")
            lines.append(f"{'batch':>5} {'ctx':>6} {'paged16':>8} {'contig':>8} {'g.p16':>8} {'g.contig':>8} "
                         f"{'fastest peer':>15} {'us':>8} {'x':>6} {'fastest graph':>15} {'g.us':>8} {'g.x':>6}")
        else:
            lines.append("peers, prefill: us; %F = share of the bf16 matmul peak; x = fastest matching peer / our best")
            lines.append(f"{'batch':>5} {'ctx':>6} {'chunk':>6} {'paged16':>8} {'contig':>8} {'%F':>5} "
                         f"{'fastest peer':>15} {'us':>8} {'%F':>5} {'x':>6}")
        worst: list[tuple[float, str]] = []
        for batch, context, q_len in cases:
            p16 = ours.get((kernel, batch, context, q_len, "paged"))
            contig = ours.get((kernel, batch, context, q_len, "contiguous"))
            mine = [r for r in (p16, contig) if r is not None]
            ok = [r for r in theirs if (r.kernel, r.batch, r.context, r.q_len) == (kernel, batch, context, q_len)
                  and r.peer_status.startswith("ok")]
            get = lambda r, field: getattr(r, field) if r is not None else math.nan  # noqa: E731
            best = min((r.time_us for r in mine if not math.isnan(r.time_us)), default=math.nan)
            peer = _fastest(ok, "time_us")
            x = get(peer, "time_us") / best
            name = peer.addressing if peer else "-"
            if kernel == "decode":
                g_best = min((r.graph_us for r in mine if not math.isnan(r.graph_us)), default=math.nan)
                g_peer = _fastest(ok, "graph_us")
                gx = get(g_peer, "graph_us") / g_best
                lines.append(f"{batch:5d} {context:6d} {get(p16, 'time_us'):8.1f} {get(contig, 'time_us'):8.1f} "
                             f"{get(p16, 'graph_us'):8.1f} {get(contig, 'graph_us'):8.1f} {name:>15} "
                             f"{get(peer, 'time_us'):8.1f} {x:6.2f} {g_peer.addressing if g_peer else '-':>15} "
                             f"{get(g_peer, 'graph_us'):8.1f} {gx:6.2f}")
                worst += [(gx, f"b{batch} ctx{context} ({g_peer.addressing}, graph)")] if g_peer else []
            else:
                top = min(mine, key=lambda r: r.time_us if not math.isnan(r.time_us) else math.inf, default=None)
                lines.append(f"{batch:5d} {context:6d} {q_len:6d} {get(p16, 'time_us'):8.1f} {get(contig, 'time_us'):8.1f} "
                             f"{100 * get(top, 'flops_frac'):5.1f} {name:>15} {get(peer, 'time_us'):8.1f} "
                             f"{100 * get(peer, 'flops_frac'):5.1f} {x:6.2f}")
                worst += [(x, f"b{batch} ctx{context}+{q_len} ({peer.addressing})")] if peer else []
        measured_worst = [w for w in worst if not math.isnan(w[0])]
        if measured_worst:
            x, where = min(measured_worst)
            goal = ">= 1.00, graph replay" if kernel == "decode" else ">= 0.90"
            lines.append(f"{kernel} vs fastest peer: worst x {x:.2f} at {where} ({goal})")
    for batch, context in sorted({(r.batch, r.context) for r in rows if r.kernel == "decode" and not math.isnan(r.host_us)}):
        host = {r.addressing: r.host_us for r in rows if (r.kernel, r.batch, r.context) == ("decode", batch, context)
                and not math.isnan(r.host_us) and r.block_size in (0, PEER_BLOCK_SIZE)}
        sdpa = min((t for name, t in host.items() if name.startswith("sdpa_")), default=math.nan)
        ours_host = max(host.get("paged", math.nan), host.get("contiguous", math.nan))
        lines.append(f"eager host us/call b{batch} ctx{context}: " + ", ".join(f"{name} {t:.1f}" for name, t in host.items())
                     + f"; paged/contiguous {host.get('paged', math.nan) / host.get('contiguous', math.nan):.2f}"
                     + f", ours (slower addressing) / fastest SDPA {ours_host / sdpa:.2f} (<= 1)")
        again = {r.addressing: r.host_repeat_us for r in rows
                 if (r.kernel, r.batch, r.context) == ("decode", batch, context)
                 and not math.isnan(r.host_repeat_us) and r.block_size in (0, PEER_BLOCK_SIZE)}
        if again:
            ours_again = max(again.get("paged", math.nan), again.get("contiguous", math.nan))
            lines.append(f"  repeated (triton_ops.repeatable, as in the engines' layers after the first): "
                         + ", ".join(f"{name} {t:.1f}" for name, t in again.items())
                         + f"; paged/contiguous {again.get('paged', math.nan) / again.get('contiguous', math.nan):.2f}"
                         + f", slower / fastest SDPA {ours_again / sdpa:.2f}")
    notes: dict[tuple[str, str], list[str]] = {}
    for r in theirs:
        if r.peer_status != "ok":
            where = f"b{r.batch} ctx{r.context}" + (f"+{r.q_len}" if r.kernel == "prefill" else "")
            notes.setdefault((f"{r.kernel} {r.addressing}", r.peer_status), []).append(where)
    for (what, status), where in notes.items():
        lines.append(f"{what}: {status} [{', '.join(where[:4])}{', ...' if len(where) > 4 else ''}]")
    return lines


def summary(rows: list[Row], peaks: DevicePeaks) -> str:
    """The figures the targets name, worst cases first."""
    def pick(**want) -> list[Row]:
        return [r for r in rows if all(getattr(r, k) == v for k, v in want.items())]

    lines = [f"device: {peaks.device_name}  read B = {peaks.read_bw_bytes_per_s / 1e9:,.0f} GB/s  "
             f"bf16 F = {peaks.bf16_flops_per_s / 1e12:,.0f} TFLOP/s"]
    if pick(kernel="decode", addressing="contiguous"):
        lines.append(f"{'batch':>5} {'ctx':>6} {'contig us':>10} {'paged16 us':>10} {'p16/c':>6} {'p1/c':>6} "
                     f"{'p256/c':>6} {'p16 %B':>7} {'sdpa us':>9}")
    ratios: dict[int, list[tuple[float, Row]]] = {}
    for c in pick(kernel="decode", addressing="contiguous"):
        paged = {r.block_size: r for r in pick(kernel="decode", addressing="paged", batch=c.batch, context=c.context)}
        sdpa = pick(kernel="decode", addressing="sdpa", batch=c.batch, context=c.context)
        for bs, r in paged.items():
            ratios.setdefault(bs, []).append((r.time_us / c.time_us, r))
        cell = lambda bs: f"{paged[bs].time_us / c.time_us:6.3f}" if bs in paged else f"{'-':>6}"  # noqa: E731
        p16 = paged.get(16)
        lines.append(f"{c.batch:5d} {c.context:6d} {c.time_us:10.1f} {p16.time_us if p16 else math.nan:10.1f} "
                     f"{cell(16)} {cell(1)} {cell(256)} {100 * p16.bw_frac if p16 else math.nan:6.1f}% "
                     f"{sdpa[0].time_us if sdpa else math.nan:9.1f}")
    target = pick(kernel="decode", addressing="paged", block_size=16, batch=64, context=4096)
    if target:
        lines.append(f"target paged decode b64 ctx4096 bs16: {100 * target[0].bw_frac:.1f}% of B (>= 80%)")
    for bs in sorted(ratios):
        in_range = [(x, r) for x, r in ratios[bs] if r.context <= 16384]
        worst, r = max(in_range, key=lambda item: item[0])
        lines.append(f"worst paged/contiguous, block size {bs}: {worst:.3f} at batch {r.batch} ctx {r.context}"
                     + (" (<= 1.05)" if bs == 16 else ""))
    longest = [r for r in pick(kernel="decode", addressing="paged", block_size=16, batch=1) if r.context > 16384]
    nosplit = pick(kernel="decode_nosplit")
    if longest:
        r = longest[0]
        extra = f"; without split-KV {100 * nosplit[0].bw_frac:.1f}%" if nosplit else ""
        lines.append(f"target batch 1 ctx {r.context} ({r.splits} splits): {100 * r.bw_frac:.1f}% of B (>= 60%){extra}")
    for s in pick(kernel="prefill", addressing="sdpa_flash", context=0):
        for r in pick(kernel="prefill", batch=s.batch, q_len=s.q_len, context=0, peer_status=""):
            if r.addressing != "sdpa_flash":
                lines.append(f"prefill b{r.batch} L{r.q_len} {r.addressing}: {r.tflops:.0f} TFLOP/s = "
                             f"{s.time_us / r.time_us:.2f} x SDPA flash ({s.tflops:.0f}) (>= 0.50)")
    for r in pick(kernel="prefill", peer_status=""):
        if r.context:
            lines.append(f"chunked prefill b{r.batch} ctx{r.context}+{r.q_len} {r.addressing}: {r.time_us:.0f} us, {r.tflops:.0f} TFLOP/s")
    for r in rows:
        if r.kernel in ("write_kv", "copy_blocks"):
            lines.append(f"{r.kernel}: {r.time_us:.1f} us, {r.gbps:,.0f} GB/s moved")
    best: dict[tuple, Row] = {}
    for r in rows:
        if r.kernel.startswith("tune") and not math.isnan(r.time_us):
            key = (r.kernel, r.addressing, r.batch, r.context)
            if key not in best or r.time_us < best[key].time_us:
                best[key] = r
    for (kernel, addressing, batch, context), r in sorted(best.items()):
        lines.append(f"best {kernel} {addressing} b{batch} ctx{context or r.q_len}: {r.time_us:.1f} us ({r.config})")
    lines += peer_summary(rows)
    lines += layer_summary(rows)
    lines += vmm_summary(rows)
    return "\n".join(lines)


class CsvLog:
    """Rows written as they are measured, so a run cut short keeps what it measured."""

    def __init__(self, path: Path | None, meta: dict):
        self.meta = meta
        self.names = [f.name for f in fields(Row)] + list(meta)
        self.fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = path.open("w", newline="")
            self.writer = csv.DictWriter(self.fh, fieldnames=self.names)
            self.writer.writeheader()

    def add(self, row: Row) -> None:
        if self.fh is not None:
            self.writer.writerow({**{f.name: getattr(row, f.name) for f in fields(Row)}, **self.meta})
            self.fh.flush()


class VMMCache:
    """``cache``'s K and V copied into virtual-contiguous memory as the vattention engine lays it out: one
    reservation, after the anchor page, each sequence at the start of its own slot of whole driver pages, only
    the pages it fills mapped (engines.kv.cuda_vmm)."""

    def __init__(self, cache: Cache) -> None:
        from engines.kv.cuda_vmm import CudaPageStorage, granularity
        from engines.kv.storage import PageGeometry

        token_bytes = KV_HEADS * HEAD_DIM * cache.k.element_size()
        per_page = granularity(cache.device) // token_bytes
        pages = -(-cache.length // per_page)
        geometry = PageGeometry(1, cache.batch, pages * per_page, per_page, token_bytes)
        shape = (1, 2, geometry.plane_tokens, KV_HEADS, HEAD_DIM)
        self.storage = CudaPageStorage(geometry, cache.batch * pages, shape, cache.k.dtype, cache.device)
        self.storage.apply([], [(b, j, b * pages + j) for b in range(cache.batch) for j in range(pages)])
        self.k, self.v = self.storage.tensor[0, 0], self.storage.tensor[0, 1]
        for dst, src in ((self.k, cache.k), (self.v, cache.v)):
            dst[per_page:].view(cache.batch, geometry.slot_tokens, KV_HEADS, HEAD_DIM)[:, : cache.length].copy_(
                src.view(cache.batch, cache.length, KV_HEADS, HEAD_DIM))
        self.seq_starts = per_page + torch.arange(cache.batch, dtype=torch.int32, device=cache.device) * geometry.slot_tokens


def vmm_rows(plan: Plan, peaks: DevicePeaks, dtype: torch.dtype, device: torch.device) -> Iterable[Row]:
    """The contiguous decode kernel on virtual-contiguous memory (driver pages mapped into one reservation)
    against the same kernel on an ordinary allocation (they should be equal, bitwise: checked) and the paged kernel
    (block size 16, the same memory through a shuffled table), timed in interleaved passes."""
    for batch, context in [(b, c) for b in plan.batches for c in plan.contexts]:
        cache = Cache(batch, context, dtype, device)
        vmm = VMMCache(cache)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
        table = cache.block_table(16)
        calls = {
            "contiguous": lambda: triton_ops.decode_attention(
                q, cache.k, cache.v, cache.seq_lens, seq_starts=cache.seq_starts, max_seq_len=context, validate=False),
            "contiguous_vmm": lambda: triton_ops.decode_attention(
                q, vmm.k, vmm.v, cache.seq_lens, seq_starts=vmm.seq_starts, max_seq_len=context, validate=False),
            "paged": lambda: triton_ops.decode_attention(
                q, cache.k, cache.v, cache.seq_lens, block_tables=table, block_size=16, max_seq_len=context,
                validate=False),
        }
        expected = calls["contiguous"]()
        # paged reads the same memory through a shuffled table (other tokens): timed, not compared
        status = {"contiguous": "ok", "paged": "timing only",
                  "contiguous_vmm": "ok" if torch.equal(calls["contiguous_vmm"](), expected) else "mismatch"}
        times = interleaved({name: (lambda fn=fn: time_us(fn, plan.rep_ms)) for name, fn in calls.items()},
                            plan.decode_passes)
        nbytes = kv_bytes(batch * context, dtype)
        base = median_us(times["contiguous"])
        for name, passes in times.items():
            t = median_us(passes)
            yield Row("decode_vmm", name, 16 if name == "paged" else 0, batch, context, 1, 0, t, nbytes,
                      nbytes / t / 1e3, nbytes / (t * 1e-6) / peaks.read_bw_bytes_per_s, 0.0,
                      time_us_passes=format_passes(passes), peer_status=status[name], ratio_to_ours=t / base)
        vmm.storage.close()


def vmm_summary(rows: list[Row]) -> list[str]:
    picked = [r for r in rows if r.kernel == "decode_vmm" and r.addressing != "contiguous"]
    return [f"decode b{r.batch} ctx{r.context} {r.addressing}: {r.time_us:.1f} us = {r.ratio_to_ours:.3f} x contiguous "
            f"on an ordinary allocation ({100 * r.bw_frac:.1f}% of B) {r.peer_status}" for r in picked]


SECTIONS = {"decode": decode_rows, "prefill": prefill_rows, "cache": cache_op_rows, "layers": layer_rows, "tune": tune_rows,
            "peers": peer_rows, "vmm": vmm_rows}


def _decode_cases(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x512,64x4096"`` -> ``((1, 512), (64, 4096))``."""
    try:
        return tuple((int(b), int(c)) for b, c in (item.lower().split("x") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxCTX[,BxCTX...], got {text!r}") from None


def _peer_names(text: str) -> tuple[str, ...]:
    """``"all"`` -> every peer; ``"none"`` or ``""`` -> none; else comma-separated names."""
    if text.strip().lower() == "all":
        return peers.PEERS
    names = tuple(name.strip() for name in text.split(",") if name.strip() and name.strip().lower() != "none")
    unknown = [name for name in names if name not in peers.PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown)}; choose from all, none, {', '.join(peers.PEERS)}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels_bench.csv")
    parser.add_argument("--quick", action="store_true", help="a few shapes, short repetitions")
    parser.add_argument("--sections", default="decode,prefill,cache,layers",
                        help=f"comma-separated, from {','.join(SECTIONS)} (tune sweeps tile configs; peers times "
                             "other libraries' kernels beside ours; vmm the contiguous decode on virtual-contiguous "
                             "memory)")
    parser.add_argument("--refresh-peaks", action="store_true", help="measure B and F again")
    parser.add_argument("--decode-cases", type=_decode_cases, default=(),
                        help="decode cases BxCTX, comma-separated (e.g. 1x512,64x4096), instead of the full grid")
    parser.add_argument("--passes", type=_positive_int, default=Plan.decode_passes,
                        help="decode: interleaved passes over each case's variants; rows report the median "
                             f"(default {Plan.decode_passes})")
    parser.add_argument("--peers", type=_peer_names, default=(),
                        help=f"other libraries' kernels timed beside ours: all, none or some of {','.join(peers.PEERS)}; "
                             "in the decode and prefill sections none by default, in the peers section all")
    parser.add_argument("--graph-calls", type=_positive_int, default=GRAPH_CALLS,
                        help=f"with peers, decode is also timed as this many calls in one CUDA graph (default {GRAPH_CALLS})")
    return parser.parse_args(argv)


def _installed(distribution: str) -> str:
    """A package's installed version, "" if it is not installed (read without importing it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    plan = dataclasses.replace(QUICK if args.quick else FULL, decode_cases=args.decode_cases,
                               decode_passes=args.passes, peers=args.peers, graph_calls=args.graph_calls)
    peaks = device_peaks(device, refresh=args.refresh_peaks)
    meta = {"gpu": peaks.device_name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."),
            "read_bw_gbps": round(peaks.read_bw_bytes_per_s / 1e9, 1),
            "bf16_tflops": round(peaks.bf16_flops_per_s / 1e12, 1), "decode_passes": plan.decode_passes,
            "flashinfer": _installed("flashinfer-python")}
    log = CsvLog(None if args.out is None else args.out / "kernels_bench.csv", meta)
    rows: list[Row] = []
    for name in args.sections.split(","):
        for row in SECTIONS[name](plan, peaks, dtype, device):
            print(f"{row.kernel:>14} {row.addressing:>10} bs={row.block_size:<3} b={row.batch:<4} ctx={row.context:<6} "
                  f"q={row.q_len:<5} {row.time_us:10.1f} us {row.gbps:8.0f} GB/s {row.tflops:6.0f} TF {row.config}"
                  + (f" passes {row.time_us_passes}" if row.time_us_passes else "")
                  + (f" graph {row.graph_us:.1f} us" if not math.isnan(row.graph_us) else "")
                  + (f" host {row.host_us:.1f} us" if not math.isnan(row.host_us) else "")
                  + (f" [{row.peer_status}]" if row.peer_status else ""), flush=True)
            rows.append(row)
            log.add(row)
        torch.cuda.empty_cache()
    print(summary(rows, peaks))


if __name__ == "__main__":
    main()
