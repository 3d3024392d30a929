"""The Triton kernels on the CPU, under Triton's interpreter, against the torch references.

``TRITON_INTERPRET=1`` only works when it is set before triton is first imported (triton's
own library functions are compiled or interpreted at import), and it must not leak into
the GPU tests of the same pytest run. So in an ordinary run this module does one thing:
``test_under_interpreter`` runs this same file in a child pytest with the variable set,
where the tests below run and the driver skips itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference
from kernels.checks import KernelArgumentError

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETED:
    import numpy as np
    import triton.language as tl
    from test_kernels_triton import assert_close_ulps, assert_rotary_close
    from triton.runtime import interpreter

    from kernels import triton_decode, triton_linear, triton_ops

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_index(tensor, scope) -> None:
        """Triton 3.6's interpreter turns scalars into 1-element arrays that numpy >= 2.4
        refuses to convert with int() (triton-lang/triton#9171, fixed upstream): squeeze first."""
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_index

    _cast_impl = interpreter.InterpreterBuilder.cast_impl

    def _cast_rounding_bf16(self, src, dst_type):
        """Triton 3.6's interpreter truncates float32 -> bf16 casts; the GPU (and torch) round to
        nearest even. Round here too, so that bf16 results can be compared bit for bit."""
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return _cast_impl(self, src, dst_type)
        data = np.asarray(src.data, dtype=np.float32)
        bits = data.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        return interpreter.TensorHandle(np.where(np.isnan(data), 0x7FC0, rounded).astype(np.uint16), dst_type.scalar)

    interpreter.InterpreterBuilder.cast_impl = _cast_rounding_bf16

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the child pytest under TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_under_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances against the fp32 reference: bf16 P@V rounding dominates (see the GPU tests).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def make_cache(num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    k = torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype)
    return k, v


def paged_layout(lens: list[int], block_size: int, gen: torch.Generator, spare: int = 3):
    """A shuffled (non-contiguous) block table with garbage past each sequence's last block."""
    per_seq = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = len(lens) * per_seq + spare
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = perm[: len(lens) * per_seq].view(len(lens), per_seq).clone()
    for b, n in enumerate(lens):
        table[b, -(-n // block_size):] = 10**6  # unused entries: must never be read
    return table, num_blocks * block_size


def contiguous_layout(lens: list[int], gen: torch.Generator, gap: int = 5):
    starts, pos = [], int(torch.randint(0, gap, (1,), generator=gen))
    for n in lens:
        starts.append(pos)
        pos += n + gap
    return torch.tensor(starts, dtype=torch.int32), pos


def addressing(mode: str, lens: list[int], block_size: int, gen: torch.Generator):
    if mode == "paged":
        table, slots = paged_layout(lens, block_size, gen)
        return {"block_tables": table, "block_size": block_size}, slots
    starts, slots = contiguous_layout(lens, gen)
    return {"seq_starts": starts}, slots


def run_decode(lens, heads, kv_heads, head_dim, dtype, mode, block_size, seed, num_splits=None):
    gen = torch.Generator().manual_seed(seed)
    addr, slots = addressing(mode, lens, block_size, gen)
    k, v = make_cache(slots, kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = reference.decode_attention(q.float(), k.float(), v.float(), seq_lens, **addr)
    if num_splits is None:
        out = triton_ops.decode_attention(q, k, v, seq_lens, **addr)
    else:
        table = addr.get("block_tables", addr.get("seq_starts"))
        out = triton_decode.decode(q, k, v, seq_lens, table, paged=mode == "paged", block_size=block_size,
                                   scale=head_dim**-0.5, max_seq_len=max(lens), num_splits=num_splits)
    return out, ref


@needs_interpreter
@pytest.mark.parametrize("block_size", [1, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_block_sizes_and_gqa(block_size, group):
    kv_heads = 2 if group == 1 else 1
    out, ref = run_decode([1, 37, 300], heads=group * kv_heads, kv_heads=kv_heads, head_dim=16,
                          dtype=torch.float32, mode="paged", block_size=block_size, seed=group)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["paged", "contiguous"])
def test_decode_dtypes_and_addressing(dtype, mode):
    out, ref = run_decode([5, 1, 50], heads=4, kv_heads=2, head_dim=32, dtype=dtype, mode=mode, block_size=4, seed=1)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_decode_split_kv_merges_exactly(num_splits):
    """Splits cover uneven lengths, empty slices (7 splits of 20 tokens) and a length-1 sequence."""
    out, ref = run_decode([20, 1, 70], heads=4, kv_heads=1, head_dim=16, dtype=torch.float32,
                          mode="paged", block_size=2, seed=num_splits, num_splits=num_splits)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
def test_decode_empty_sequence_gives_zeros():
    """A padding row of a CUDA-graph batch (length 0) writes zeros, never NaN."""
    gen = torch.Generator().manual_seed(0)
    k, v = make_cache(64, 1, 16, torch.float32, gen)
    q = torch.randn(2, 2, 16, generator=gen)
    seq_lens = torch.tensor([0, 9], dtype=torch.int32)
    starts = torch.tensor([0, 10], dtype=torch.int32)
    for splits in (1, 2):
        out = triton_decode.decode(q, k, v, seq_lens, starts, paged=False, block_size=1, scale=0.25,
                                   max_seq_len=16, num_splits=splits)
        ref = reference.decode_attention(q[1:], k, v, seq_lens[1:], seq_starts=starts[1:], scale=0.25)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert rel_err(out[1:], ref) < 1e-5


@needs_interpreter
@settings(max_examples=12, deadline=None)
@given(
    lens=st.lists(st.integers(1, 80), min_size=1, max_size=3),
    block_size=st.sampled_from([1, 2, 8, 32]),
    group=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from(["paged", "contiguous"]),
    seed=st.integers(0, 2**16),
)
def test_decode_matches_reference(lens, block_size, group, mode, seed):
    out, ref = run_decode(lens, heads=group, kv_heads=1, head_dim=16, dtype=torch.float32,
                          mode=mode, block_size=block_size, seed=seed)
    assert rel_err(out, ref) < TOL[torch.float32]


def run_prefill(q_lens, seq_lens, heads, kv_heads, head_dim, dtype, mode, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    addr, slots = addressing(mode, seq_lens, block_size, gen)
    k, v = make_cache(slots, kv_heads, head_dim, dtype, gen)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), qsl, lens, **addr)
    out = triton_ops.prefill_attention(q, k, v, qsl, lens, **addr)
    return out, ref


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunked_with_earlier_context(dtype):
    """Chunks after earlier context (prefix hits, later chunks), a full prefill, a decode-like token."""
    out, ref = run_prefill([20, 33, 1], [45, 33, 17], heads=4, kv_heads=2, head_dim=32, dtype=dtype,
                           mode="paged", block_size=8, seed=2)
    assert rel_err(out, ref) < TOL[dtype]


@needs_interpreter
@pytest.mark.parametrize("mode,block_size", [("contiguous", 1), ("paged", 1), ("paged", 256)])
def test_prefill_addressing(mode, block_size):
    out, ref = run_prefill([17, 5], [40, 5], heads=8, kv_heads=1, head_dim=16, dtype=torch.float32,
                           mode=mode, block_size=block_size, seed=3)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
def test_prefill_skips_empty_queries():
    out, ref = run_prefill([0, 9], [12, 9], heads=2, kv_heads=2, head_dim=16, dtype=torch.float32,
                           mode="paged", block_size=4, seed=4)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
@settings(max_examples=6, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 24)), min_size=1, max_size=2),
    block_size=st.sampled_from([1, 4, 16]),
    mode=st.sampled_from(["paged", "contiguous"]),
    seed=st.integers(0, 2**16),
)
def test_prefill_matches_reference(chunks, block_size, mode, seed):
    q_lens = [q for _, q in chunks]
    seq_lens = [c + q for c, q in chunks]
    out, ref = run_prefill(q_lens, seq_lens, heads=2, kv_heads=1, head_dim=16, dtype=torch.float32,
                           mode=mode, block_size=block_size, seed=seed)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_skips_padding(dtype):
    gen = torch.Generator().manual_seed(5)
    k, v = make_cache(40, 3, 16, dtype, gen)
    k_ref, v_ref = k.clone(), v.clone()
    key = torch.randn(6, 3, 16, generator=gen).to(dtype)
    value = torch.randn(6, 3, 16, generator=gen).to(dtype)
    slots = torch.tensor([7, -1, 39, 0, -1, 12])
    triton_ops.write_kv(key, value, k, v, slots)
    reference.write_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@needs_interpreter
def test_write_kv_strided_rows():
    """key/value as views of a fused projection (token stride larger than Hkv * D)."""
    gen = torch.Generator().manual_seed(6)
    k, v = make_cache(16, 2, 16, torch.float32, gen)
    k_ref, v_ref = k.clone(), v.clone()
    fused = torch.randn(4, 3, 2, 16, generator=gen)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.tensor([3, 2, 1, 15], dtype=torch.int32)
    triton_ops.write_kv(key, value, k, v, slots)
    reference.write_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@needs_interpreter
@pytest.mark.parametrize("block_size", [1, 16])
def test_copy_blocks(block_size):
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(2, 2, 8 * block_size, 2, 16, generator=gen).to(torch.bfloat16)
    expected = cache.clone()
    src, dst = torch.tensor([0, 5, 2]), torch.tensor([7, 1, 3])
    triton_ops.copy_blocks(cache, src, dst, block_size)
    reference.copy_blocks(expected, src, dst, block_size)
    assert torch.equal(cache, expected)


@needs_interpreter
def test_swap_blocks_between_cpu_caches():
    """Pageable CPU memory: the torch-indexing path."""
    gen = torch.Generator().manual_seed(8)
    src_cache = torch.randn(2, 2, 32, 2, 16, generator=gen)
    dst_cache = torch.zeros(2, 2, 16, 2, 16)
    expected = dst_cache.clone()
    src, dst = torch.tensor([3, 0]), torch.tensor([1, 2])
    triton_ops.swap_blocks(src_cache, dst_cache, src, dst, 4)
    reference.swap_blocks(src_cache, expected, src, dst, 4)
    assert torch.equal(dst_cache, expected)


# -- the decoder's elementwise layers: bit-level agreement with the torch reference


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 96), (2, 3, 64), (1, 1000)])
def test_rms_norm_matches_reference(dtype, shape):
    """Several rows per program (37 rows), leading dimensions, one row of a width no power of two."""
    gen = torch.Generator().manual_seed(9)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=gen) / 4).to(dtype)
    out = triton_ops.rms_norm(x, weight, 1e-6)
    assert_close_ulps(out, reference.rms_norm(x, weight, 1e-6))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(dtype):
    gen = torch.Generator().manual_seed(10)
    wide = torch.randn(19, 160, generator=gen).to(dtype)
    x = wide[:, 16:144]  # a row stride larger than the row
    residual = torch.randn(19, 128, generator=gen).to(dtype)
    weight = torch.randn(128, generator=gen).to(dtype)
    kept = residual.clone()
    out, summed = triton_ops.add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_summed = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_summed) and torch.equal(residual, kept)
    assert_close_ulps(out, ref_out)


@needs_interpreter
def test_norms_promote_like_torch():
    """A float32 weight over bf16 activations gives float32 results, as ``weight * normed`` does in torch."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    residual = torch.randn(5, 64, generator=gen)
    weight = torch.randn(64, generator=gen)
    out = triton_ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    assert_close_ulps(out, reference.rms_norm(x, weight, 1e-6))
    out, summed = triton_ops.add_rms_norm(x, residual, weight.to(torch.float16), 1e-6)
    ref_out, ref_summed = reference.add_rms_norm(x, residual, weight.to(torch.float16), 1e-6)
    assert torch.equal(summed, ref_summed)
    assert_close_ulps(out, ref_out)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2 * 1100), (2, 5, 14)])
def test_silu_and_mul_matches_reference(dtype, shape):
    """Two column blocks per row (1100 > 1024), and leading dimensions."""
    gen = torch.Generator().manual_seed(12)
    gate_up = (4 * torch.randn(shape, generator=gen)).to(dtype)
    out = triton_ops.silu_and_mul(gate_up)
    assert_close_ulps(out, reference.silu_and_mul(gate_up))


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """q and k as the attention layer makes them: views of one fused projection output."""
    qkv = (2 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)


def rope_table(max_pos: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (6, 1, 256), (3, 3, 24)])
def test_rotary_embedding_matches_reference(dtype, norm, heads, kv_heads, head_dim):
    """Strided q/k views; several head blocks with a partial one (6 heads of 256 dims, 4 per
    program); a head_dim whose half is no power of two (24). Without the norm every product
    and sum is rounded exactly as torch rounds it: the results are bit-identical."""
    gen = torch.Generator().manual_seed(13 + head_dim)
    q, k = qkv_views(5, heads, kv_heads, head_dim, dtype, gen)
    positions = torch.tensor([3, 0, 63, 17, 17], dtype=torch.int32)
    cos_sin = rope_table(64, head_dim, dtype)
    weights = [(1 + torch.randn(head_dim, generator=gen) / 4).to(dtype) for _ in range(2)] if norm else [None, None]
    out_q, out_k = triton_ops.rotary_embedding(positions, q, k, cos_sin, *weights, 1e-6)
    ref_q, ref_k = reference.rotary_embedding(positions, q, k, cos_sin, *weights, 1e-6)
    for out, ref, x, weight in ((out_q, ref_q, q, weights[0]), (out_k, ref_k, k, weights[1])):
        assert out.dtype == ref.dtype and out.is_contiguous()
        if norm:
            assert_rotary_close(out, ref, reference.rms_norm(x, weight, 1e-6))
        else:
            assert torch.equal(out, ref)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (6, 6, 256), (3, 1, 16)])
def test_rotary_write_kv_is_rotary_then_write_kv_bit_for_bit(dtype, norm, heads, kv_heads, head_dim):
    """The fused launch against the two it replaces, on q/k/v views of one projection: the same rotated q, the
    same cache contents (padding slots skipped, every other slot untouched); several k head blocks (6 heads of
    256 dims, 4 per program) and MQA."""
    gen = torch.Generator().manual_seed(29 + head_dim)
    tokens = 5
    qkv = (2 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)).to(dtype)
    q, k, v = (x.view(tokens, -1, head_dim) for x in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                  kv_heads * head_dim], dim=-1))
    positions = torch.tensor([3, 0, 63, 17, 17], dtype=torch.int32)
    cos_sin = rope_table(64, head_dim, dtype)
    weights = [(1 + torch.randn(head_dim, generator=gen) / 4).to(dtype) for _ in range(2)] if norm else [None, None]
    slots = torch.tensor([7, -1, 11, 0, -1])
    k_cache, v_cache = make_cache(12, kv_heads, head_dim, dtype, gen)
    k_two, v_two = k_cache.clone(), v_cache.clone()
    fused_q = triton_ops.rotary_write_kv(positions, q, k, v, cos_sin, *weights, 1e-6, k_cache, v_cache, slots)
    two_q, two_k = triton_ops.rotary_embedding(positions, q, k, cos_sin, *weights, 1e-6)
    triton_ops.write_kv(two_k, v, k_two, v_two, slots)
    assert torch.equal(fused_q, two_q) and torch.equal(k_cache, k_two) and torch.equal(v_cache, v_two)
    ref_k, ref_v = make_cache(12, kv_heads, head_dim, dtype, torch.Generator().manual_seed(0))
    ref_q = reference.rotary_write_kv(positions, q, k, v, cos_sin, *weights, 1e-6, ref_k, ref_v, slots)
    assert torch.equal(ref_v[slots[slots >= 0]], v_cache[slots[slots >= 0]])
    if not norm:  # the reference rounds as the kernel does (see the rotary test)
        assert torch.equal(ref_q, fused_q) and torch.equal(ref_k[slots[slots >= 0]], k_cache[slots[slots >= 0]])


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attention_writes_into_a_given_output_view(backend):
    """``out=``: decode and prefill write their rows into a view of a larger buffer (the layer's one output for a
    mixed step), return it, and leave the rest of the buffer alone."""
    ops = triton_ops if backend == "triton" else reference
    gen = torch.Generator().manual_seed(41)
    addr, slots = addressing("paged", [9, 14], 4, gen)
    k, v = make_cache(slots, 2, 16, torch.float32, gen)
    seq_lens = torch.tensor([9, 14], dtype=torch.int32)
    q = torch.randn(2, 4, 16, generator=gen)
    buffer = torch.full((5, 4, 16), 7.0)
    got = ops.decode_attention(q, k, v, seq_lens, **addr, out=buffer[1:3])
    assert got.data_ptr() == buffer[1:3].data_ptr()
    assert torch.equal(buffer[1:3], ops.decode_attention(q, k, v, seq_lens, **addr))
    assert (buffer[[0, 3, 4]] == 7.0).all()
    qp = torch.randn(5, 4, 16, generator=gen)
    qsl = torch.tensor([0, 2, 5], dtype=torch.int32)
    buffer = torch.full((8, 4, 16), 7.0)
    ops.prefill_attention(qp, k, v, qsl, seq_lens, **addr, out=buffer[3:])
    assert torch.equal(buffer[3:], ops.prefill_attention(qp, k, v, qsl, seq_lens, **addr))
    assert (buffer[:3] == 7.0).all()
    with pytest.raises(KernelArgumentError, match="out must be"):
        ops.decode_attention(q, k, v, seq_lens, **addr, out=buffer[:3])


def poison_outside_window(k, v, addr, lens, first_seen, block_size):
    """NaN in the K/V of every position of sequence b before ``first_seen[b]``: a kernel that reads one there
    (even with a zero weight) returns NaN."""
    k, v = k.clone(), v.clone()
    for b, (n, lo) in enumerate(zip(lens, first_seen)):
        pos = torch.arange(max(0, min(lo, n)))
        if "block_tables" in addr:
            slots = addr["block_tables"][b, pos // block_size].long() * block_size + pos % block_size
        else:
            slots = addr["seq_starts"][b].long() + pos
        k[slots], v[slots] = float("nan"), float("nan")
    return k, v


@needs_interpreter
@settings(max_examples=10, deadline=None)
@given(
    lens=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    window=st.integers(1, 40),
    block_size=st.sampled_from([1, 4, 16]),
    mode=st.sampled_from(["paged", "contiguous"]),
    splits=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_windowed_decode_matches_reference_and_reads_only_the_window(lens, window, block_size, mode, splits, seed):
    gen = torch.Generator().manual_seed(seed)
    addr, slots = addressing(mode, lens, block_size, gen)
    k, v = make_cache(slots, 1, 16, torch.float32, gen)
    q = torch.randn(len(lens), 2, 16, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = reference.decode_attention(q, k, v, seq_lens, window=window, **addr)
    full = reference.decode_attention(q, k, v, seq_lens, **addr)
    k, v = poison_outside_window(k, v, addr, lens, [n - window for n in lens], block_size)
    if splits is None:
        out = triton_ops.decode_attention(q, k, v, seq_lens, window=window, **addr)
    else:
        table = addr.get("block_tables", addr.get("seq_starts"))
        out = triton_decode.decode(q, k, v, seq_lens, table, paged=mode == "paged", block_size=block_size,
                                   scale=16**-0.5, max_seq_len=max(lens), window=window, num_splits=splits)
    assert rel_err(out, ref) < TOL[torch.float32]
    if max(lens) > window:  # the window changed something: the masks are not a no-op
        assert rel_err(ref, full) > 1e-3


@needs_interpreter
@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 50)), min_size=1, max_size=3),
    window=st.integers(1, 30),
    block_size=st.sampled_from([1, 4, 16]),
    mode=st.sampled_from(["paged", "contiguous"]),
    seed=st.integers(0, 2**16),
)
def test_windowed_prefill_matches_reference_and_reads_only_the_window(shapes, window, block_size, mode, seed):
    """Chunks of ``q_len`` new tokens after ``context`` cached ones; each query sees its last ``window`` keys."""
    gen = torch.Generator().manual_seed(seed)
    q_lens, lens = [q for q, _ in shapes], [q + c for q, c in shapes]
    addr, slots = addressing(mode, lens, block_size, gen)
    k, v = make_cache(slots, 1, 16, torch.float32, gen)
    q = torch.randn(sum(q_lens), 2, 16, generator=gen)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = reference.prefill_attention(q, k, v, qsl, seq_lens, window=window, **addr)
    k, v = poison_outside_window(k, v, addr, lens, [c - window + 1 for _, c in shapes], block_size)
    out = triton_ops.prefill_attention(q, k, v, qsl, seq_lens, window=window, **addr)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_windowed_reference_is_brute_force_attention():
    """The references against attention written out: softmax over the keys each query sees."""
    gen = torch.Generator().manual_seed(3)
    n, q_len, window = 23, 9, 5
    k, v = torch.randn(n, 1, 8, generator=gen), torch.randn(n, 1, 8, generator=gen)
    q = torch.randn(q_len, 2, 8, generator=gen)
    starts = torch.zeros(1, dtype=torch.int32)
    got = reference.prefill_attention(q, k, v, torch.tensor([0, q_len], dtype=torch.int32),
                                      torch.tensor([n], dtype=torch.int32), seq_starts=starts, window=window)
    for r in range(q_len):
        i = n - q_len + r
        seen = torch.arange(max(0, i - window + 1), i + 1)
        for h in range(2):
            w = torch.softmax(k[seen, 0] @ q[r, h] * 8**-0.5, dim=0)
            assert torch.allclose(got[r, h], w @ v[seen, 0], atol=1e-5)
    dec = reference.decode_attention(q[-1:], k, v, torch.tensor([n], dtype=torch.int32), seq_starts=starts,
                                     window=window)
    assert torch.allclose(dec, got[-1:], atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_ops_write_into_given_buffers(backend):
    """``add_rms_norm(out=, residual_out=)`` (the residual updated in place, as the piecewise graphs do) and
    ``rotary_write_kv(q_out=)``: the same values as new tensors, in the caller's buffers; a wrong buffer is an
    error naming it."""
    ops = triton_ops if backend == "triton" else reference
    gen = torch.Generator().manual_seed(43)
    x, residual, weight = torch.randn(6, 64, generator=gen), torch.randn(6, 64, generator=gen), torch.rand(64) + 0.5
    want, want_sum = ops.add_rms_norm(x, residual, weight, 1e-6)
    out, in_place = torch.full((6, 64), 7.0), residual.clone()
    got, got_sum = ops.add_rms_norm(x, in_place, weight, 1e-6, out=out, residual_out=in_place)
    assert got.data_ptr() == out.data_ptr() and got_sum.data_ptr() == in_place.data_ptr()
    assert torch.equal(got, want) and torch.equal(in_place, want_sum)
    for kwargs, name in (({"out": torch.empty(6, 32)}, "out must be"),
                         ({"residual_out": torch.empty(64, 6).t()}, "residual_out must be a contiguous"),
                         ({"out": torch.empty(6, 64, dtype=torch.float16)}, "out must be")):
        with pytest.raises(KernelArgumentError, match=name):
            ops.add_rms_norm(x, residual, weight, 1e-6, **kwargs)
    q, k, v = (torch.randn(3, h, 16, generator=gen) for h in (4, 2, 2))
    positions, cos_sin = torch.tensor([0, 5, 9]), rope_table(16, 16, torch.float32)
    k_cache, v_cache = make_cache(8, 2, 16, torch.float32, gen)
    slots = torch.tensor([1, -1, 6])
    want = ops.rotary_write_kv(positions, q, k, v, cos_sin, None, None, 1e-6, k_cache.clone(), v_cache.clone(), slots)
    buffer = torch.full((5, 4, 16), 7.0)
    got = ops.rotary_write_kv(positions, q, k, v, cos_sin, None, None, 1e-6, k_cache, v_cache, slots,
                              q_out=buffer[1:4])
    assert got.data_ptr() == buffer[1:4].data_ptr() and torch.equal(buffer[1:4], want)
    assert (buffer[[0, 4]] == 7.0).all()
    with pytest.raises(KernelArgumentError, match="q_out must be"):
        ops.rotary_write_kv(positions, q, k, v, cos_sin, None, None, 1e-6, k_cache, v_cache, slots,
                            q_out=buffer[:3, :2])


@needs_interpreter
@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("k", [72, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_torch_linear(split_k, rows, k, bias):
    """Every row and column of ``x @ W.T + b``, with widths that are no multiple of the tiles (masked edges), rows
    strided in memory, K split into slices (the partials summed by the tile's last program; at K = 33 in four, the
    last slice lies wholly past K and adds nothing) or not; and SwiGLU's epilogue."""
    gen = torch.Generator().manual_seed(split_k * 100 + rows + k)
    x, w = torch.randn(rows, k + 7, generator=gen)[:, :k], torch.randn(40, k, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    tiles = triton_linear.LinearTiles(block_n=16, block_k=16, split_k=split_k, num_stages=1, num_warps=1)
    got = triton_linear.skinny_linear(x.unsqueeze(0), w, b, tiles=tiles)
    assert got.shape == (1, rows, 40)
    torch.testing.assert_close(got[0], torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    again = triton_linear.skinny_linear(x, w, b, tiles=tiles)  # the tickets were reset for the next launch
    assert torch.equal(again, got[0])
    swiglu = triton_linear.skinny_linear(x, w, b, tiles=tiles, silu_and_mul=True)  # w as [gate | up]: 20 columns
    assert torch.equal(swiglu, triton_ops.silu_and_mul(got[0]))


@needs_interpreter
def test_skinny_linear_refuses_what_it_does_not_take_and_launches_nothing_for_empty_sums():
    w = torch.randn(8, 16)
    with pytest.raises(KernelArgumentError, match="at most 64 rows, got 65"):
        triton_linear.skinny_linear(torch.randn(65, 16), w)
    with pytest.raises(KernelArgumentError, match="input width 12 does not match the weight's 16"):
        triton_linear.skinny_linear(torch.randn(3, 12), w)
    with pytest.raises(KernelArgumentError, match=r"\[gate \| up\] weight, got 7 rows"):
        triton_linear.skinny_linear(torch.randn(3, 16), torch.randn(7, 16), silu_and_mul=True)
    with pytest.raises(KernelArgumentError, match=r"bias of shape \(4,\), wanted \(8,\)"):
        triton_linear.skinny_linear(torch.randn(3, 16), w, torch.randn(4))
    b = torch.randn(8)
    assert torch.equal(triton_linear.skinny_linear(torch.randn(3, 0), torch.randn(8, 0), b), b.expand(3, 8))
    assert triton_linear.skinny_linear(torch.randn(0, 16), w).shape == (0, 8)
