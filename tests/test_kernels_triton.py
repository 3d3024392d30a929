"""The Triton backend: its contract with the reference (CPU, no launch) and, on a GPU, every
attention and cache kernel against its fp32 reference at real shapes, and the elementwise layers
against the reference run in their own dtype, in ulps (errors printed; run with -s to see them).

The CPU runs of the kernels themselves live in test_kernels_interpreter.py.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import KernelArgumentError, load_backend, reference

triton_ops = pytest.importorskip("kernels.triton_ops")
triton_common = pytest.importorskip("kernels.triton_common")

FUNCTIONS = ("write_kv", "prefill_attention", "decode_attention", "copy_blocks", "swap_blocks", "linear", "linear_silu_and_mul",
             "rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding", "rotary_write_kv", "repeatable")


def test_same_functions_and_signatures_as_reference():
    for name in FUNCTIONS:
        assert inspect.signature(getattr(triton_ops, name)) == inspect.signature(getattr(reference, name)), name


@given(n=st.integers(0, 1 << 40), b=st.integers(1, 1 << 12))
def test_host_int_helpers_equal_tritons(n, b):
    """The launch wrappers' own cdiv and next_power_of_2 (Triton's cost a JIT call each) give Triton's values."""
    triton = pytest.importorskip("triton")
    from kernels.triton_common import cdiv, next_power_of_2

    assert next_power_of_2(n) == triton.next_power_of_2(n)
    assert cdiv(n, b) == triton.cdiv(n, b)


def test_specialization_keys_refine_tritons_own_specialization():
    """``launch`` reuses a compiled kernel for arguments whose ``specialization_keys`` equal those of the launch that
    compiled it: every pair of arguments with equal keys must be one that Triton itself would compile the same. Over
    tensors at every alignment and dtype, ints around each boundary Triton draws (1, multiples of 16, the 32-bit and
    64-bit ranges), floats, bools and None."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from kernels.triton_common import specialization_keys

    base = {dtype: torch.zeros(64, dtype=dtype) for dtype in (torch.bfloat16, torch.float32, torch.int32)}
    tensors = [t[i:] for t in base.values() for i in range(0, 9)]
    ints = [s * (b + d) for b in (0, 1, 16, 32, 1 << 31, 1 << 32, 1 << 63) for d in (-1, 0, 1) for s in (1, -1)]
    ints = [i for i in ints if -(1 << 63) <= i < 1 << 64]
    args = tensors + [torch.nn.Parameter(t, requires_grad=False) for t in tensors[:3]] + ints + [
        0.0, 1.0, -2.5, 1e30, True, False, None]
    tritons: dict = {}
    for a, key in zip(args, specialization_keys(args), strict=True):
        tritons.setdefault(key, set()).add(native_specialize_impl(BaseBackend, a, False, True, True))
    assert all(len(v) == 1 for v in tritons.values()), {k: v for k, v in tritons.items() if len(v) > 1}
    assert len(tritons) > 12  # the keys do tell the arguments apart


@given(batch=st.integers(1, 512), context=st.integers(1, 1 << 17), sms=st.integers(1, 256))
def test_decode_split_count_is_a_power_of_two_within_its_bound(batch, context, sms):
    """The split count fills the device at a power of two, unless that would pass the useful bound (splits of at
    least four tiles, or of one where fewer would leave SMs idle), which then caps it; and never more splits than
    tiles."""
    from kernels.triton_decode import DecodeConfig, num_kv_splits

    config = DecodeConfig(block_n=64, num_warps=4, num_stages=2)
    splits = num_kv_splits(batch, 8, context, sms, config)
    tiles = -(-context // 64)
    assert 1 <= splits <= tiles
    assert splits & (splits - 1) == 0 or splits == tiles or splits == -(-tiles // config.min_tiles_per_split)


def test_decode_split_counts_at_the_measured_shapes():
    """The counts an H100 (132 SMs) gets at the shapes of experiments/h100-2026-11-27-launch/'s sweep, where a
    power of two beat the unrounded count (7 -> 8 at batch 8 x 4,096, 50 -> 64 at batch 1 x 4,096)."""
    from kernels.triton_decode import DecodeConfig, num_kv_splits

    config = DecodeConfig(block_n=64, num_warps=4, num_stages=2)
    got = {(b, c): num_kv_splits(b, 8, c, 132, config) for b, c in
           ((1, 4096), (4, 1024), (8, 4096), (8, 16384), (2, 16384), (16, 4096), (64, 4096))}
    assert got == {(1, 4096): 64, (4, 1024): 16, (8, 4096): 8, (8, 16384): 8, (2, 16384): 32, (16, 4096): 4,
                   (64, 4096): 1}


def test_load_backend_picks_triton_by_name():
    assert load_backend("triton") is triton_ops


def _decode_args(**over):
    args = {
        "q": torch.randn(2, 4, 32),
        "k_cache": torch.randn(64, 2, 32),
        "v_cache": torch.randn(64, 2, 32),
        "seq_lens": torch.tensor([5, 9], dtype=torch.int32),
        "block_tables": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        "block_size": 8,
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, message",
    [
        ({"q": torch.randn(2, 4, 32, dtype=torch.float16)}, "q is torch.float16"),
        ({"v_cache": torch.randn(64, 2, 32, dtype=torch.bfloat16)}, "v_cache is"),
        ({"block_size": 12}, "power of two"),
        ({"block_tables": torch.tensor([[0, 1], [2, 8]], dtype=torch.int32)}, "outside the cache"),
        ({"q": torch.randn(2, 3, 32)}, "multiple of"),
        ({"q": torch.randn(2, 4, 24), "k_cache": torch.randn(64, 2, 24), "v_cache": torch.randn(64, 2, 24)}, "head_dim"),
        ({"seq_starts": torch.tensor([0, 10], dtype=torch.int32)}, "exactly one"),
    ],
)
def test_bad_decode_arguments_raise_before_launch(over, message):
    with pytest.raises(KernelArgumentError, match=message):
        triton_ops.decode_attention(**_decode_args(**over))


def test_shape_checks_hold_without_validation():
    """validate=False skips only the checks that sync; shape errors still raise."""
    with pytest.raises(KernelArgumentError, match="exactly one"):
        triton_ops.decode_attention(**_decode_args(block_tables=None), validate=False)
    with pytest.raises(KernelArgumentError, match="q is"):
        triton_ops.decode_attention(**_decode_args(q=torch.randn(2, 4, 32, dtype=torch.float16)), validate=False)


def test_bad_prefill_and_write_arguments_raise():
    k, v = torch.randn(32, 2, 16), torch.randn(32, 2, 16)
    q = torch.randn(5, 2, 16)
    qsl = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(KernelArgumentError, match="query length"):
        triton_ops.prefill_attention(q, k, v, qsl, torch.tensor([4], dtype=torch.int32),
                                     seq_starts=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(KernelArgumentError, match="slot 32"):
        triton_ops.write_kv(torch.randn(2, 2, 16), torch.randn(2, 2, 16), k, v, torch.tensor([1, 32]))
    with pytest.raises(KernelArgumentError, match="key must be"):
        triton_ops.write_kv(torch.randn(2, 3, 16), torch.randn(2, 3, 16), k, v, torch.tensor([1, 2]), validate=False)


def test_bad_block_copies_raise():
    cache = torch.randn(2, 2, 64, 2, 16)
    with pytest.raises(KernelArgumentError, match="also a src"):
        triton_ops.copy_blocks(cache, torch.tensor([0, 1]), torch.tensor([1, 2]), 16)
    with pytest.raises(KernelArgumentError, match="outside"):
        triton_ops.copy_blocks(cache, torch.tensor([0]), torch.tensor([4]), 16)
    with pytest.raises(KernelArgumentError, match="differ beyond"):
        triton_ops.swap_blocks(cache, torch.randn(2, 2, 64, 4, 16), torch.tensor([0]), torch.tensor([1]), 16)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: triton_ops.rms_norm(torch.randn(4, 64), torch.ones(32), 1e-6), r"weight must be \[64\]"),
        (lambda: triton_ops.rms_norm(torch.ones(4, 64, dtype=torch.int32), torch.ones(64), 1e-6), "x must be fp16"),
        (lambda: triton_ops.rms_norm(torch.randn(2, 40000), torch.ones(40000), 1e-6), "at most 32768"),
        (lambda: triton_ops.add_rms_norm(torch.randn(4, 64), torch.randn(3, 64), torch.ones(64), 1e-6), "residual"),
        (lambda: triton_ops.silu_and_mul(torch.randn(4, 7)), "2 \\* intermediate"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3), torch.randn(3, 4, 32), torch.randn(3, 2, 16),
                                             torch.randn(8, 32)), "does not match q"),
        (lambda: triton_ops.rotary_embedding(torch.arange(2), torch.randn(3, 4, 32), torch.randn(3, 2, 32),
                                             torch.randn(8, 32)), r"positions must be \[3\]"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3.0), torch.randn(3, 4, 32), torch.randn(3, 2, 32),
                                             torch.randn(8, 32)), "int32 or int64"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3), torch.randn(3, 4, 32), torch.randn(3, 2, 32),
                                             torch.randn(8, 16)), "cos_sin must be"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3), torch.randn(3, 4, 32), torch.randn(3, 2, 32).half(),
                                             torch.randn(8, 32)), "k is torch.float16"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3), torch.randn(3, 4, 32), torch.randn(3, 2, 32),
                                             torch.randn(8, 32), torch.ones(32)), "or neither"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3), torch.randn(3, 4, 32), torch.randn(3, 2, 32),
                                             torch.randn(8, 32), torch.ones(32), torch.ones(16)), r"k_norm_weight must be \[32\]"),
        (lambda: triton_ops.rotary_embedding(torch.arange(3), torch.randn(3, 4, 31), torch.randn(3, 2, 31),
                                             torch.randn(8, 31)), "even head_dim"),
    ],
)
def test_bad_layer_arguments_raise_before_launch(call, message):
    with pytest.raises(KernelArgumentError, match=message):
        call()


def test_seq_len_bound_comes_from_shapes():
    k = torch.empty(1000, 1, 16)
    assert triton_ops.seq_len_bound(k, torch.empty(3, 10, dtype=torch.int32), 16, None) == 160
    assert triton_ops.seq_len_bound(k, None, 1, None) == 1000
    assert triton_ops.seq_len_bound(k, None, 1, 77) == 77


# ---------------------------------------------------------------- GPU: real shapes

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def gpu_case(lens, heads, kv_heads, head_dim, dtype, block_size, paged, seed=0):
    """A cache with shuffled blocks (or regions with gaps), and fp32 copies for the reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if paged:
        per_seq = max(-(-n // block_size) for n in lens)
        num_blocks = len(lens) * per_seq + 7
        perm = torch.randperm(num_blocks, device="cuda", generator=gen)
        addr = {"block_tables": perm[: len(lens) * per_seq].view(len(lens), per_seq).to(torch.int32),
                "block_size": block_size}
        slots = num_blocks * block_size
    else:
        starts = torch.tensor([0] + lens[:-1], device="cuda").cumsum(0) + 3 * torch.arange(len(lens), device="cuda")
        addr = {"seq_starts": starts.to(torch.int32)}
        slots = sum(lens) + 3 * len(lens)
    k = torch.randn(slots, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    return k, v, addr, gen


DECODE_CASES = [
    # lens, heads, kv_heads, head_dim, dtype, block_size, paged
    ([1, 17, 4096, 1000, 333, 2048, 5, 4095], 32, 8, 128, torch.bfloat16, 16, True),
    ([1, 17, 4096, 1000, 333, 2048, 5, 4095], 32, 8, 128, torch.bfloat16, 16, False),
    ([3, 777, 2500], 32, 8, 128, torch.bfloat16, 1, True),
    ([3, 777, 2500], 32, 8, 128, torch.bfloat16, 256, True),
    ([1500] * 64, 32, 8, 128, torch.bfloat16, 16, True),
    ([32768], 32, 8, 128, torch.bfloat16, 16, True),
    ([100, 3000], 16, 16, 64, torch.float16, 16, True),
    ([100, 3000], 32, 1, 128, torch.bfloat16, 32, False),
    ([100, 1999], 16, 2, 256, torch.float32, 64, True),
    ([100, 1999], 16, 2, 256, torch.bfloat16, 8, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("lens, heads, kv_heads, head_dim, dtype, block_size, paged", DECODE_CASES)
def test_gpu_decode_matches_reference(lens, heads, kv_heads, head_dim, dtype, block_size, paged):
    k, v, addr, gen = gpu_case(lens, heads, kv_heads, head_dim, dtype, block_size, paged)
    q = torch.randn(len(lens), heads, head_dim, device="cuda", generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = triton_ops.decode_attention(q, k, v, seq_lens, **addr)
    ref = reference.decode_attention(q.float(), k.float(), v.float(), seq_lens, **addr)
    err = rel_err(out, ref)
    print(f"decode {dtype} D={head_dim} {heads}/{kv_heads} bs={block_size} paged={paged} B={len(lens)}: rel err {err:.2e}")
    assert err < TOL[dtype]


PREFILL_CASES = [
    # (context, q_len) per sequence, heads, kv_heads, head_dim, dtype, block_size, paged
    ([(0, 2048), (1000, 300), (4000, 1), (16, 777)], 32, 8, 128, torch.bfloat16, 16, True),
    ([(0, 2048), (1000, 300), (4000, 1), (16, 777)], 32, 8, 128, torch.bfloat16, 16, False),
    ([(512, 512), (0, 129)], 32, 8, 128, torch.bfloat16, 1, True),
    ([(512, 512), (0, 129)], 16, 16, 64, torch.float16, 256, True),
    ([(300, 200), (0, 65)], 16, 2, 256, torch.bfloat16, 16, True),
    ([(300, 200), (0, 65)], 8, 2, 256, torch.float32, 16, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("chunks, heads, kv_heads, head_dim, dtype, block_size, paged", PREFILL_CASES)
def test_gpu_prefill_matches_reference(chunks, heads, kv_heads, head_dim, dtype, block_size, paged):
    lens = [c + q for c, q in chunks]
    k, v, addr, gen = gpu_case(lens, heads, kv_heads, head_dim, dtype, block_size, paged, seed=1)
    q_lens = [q for _, q in chunks]
    q = torch.randn(sum(q_lens), heads, head_dim, device="cuda", generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = triton_ops.prefill_attention(q, k, v, qsl, seq_lens, **addr)
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), qsl, seq_lens, **addr)
    err = rel_err(out, ref)
    print(f"prefill {dtype} D={head_dim} {heads}/{kv_heads} bs={block_size} paged={paged}: rel err {err:.2e}")
    assert err < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 100, 1000, 4096])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_gpu_windowed_attention_matches_reference(window, paged):
    """Sliding windows shorter than some contexts and longer than others, decode and chunked prefill, bf16."""
    lens = [1, 17, 4096, 1000, 333, 2048, 5, 4095]
    k, v, addr, gen = gpu_case(lens, 32, 8, 128, torch.bfloat16, 16, paged, seed=2)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
    out = triton_ops.decode_attention(q, k, v, seq_lens, window=window, **addr)
    ref = reference.decode_attention(q.float(), k.float(), v.float(), seq_lens, window=window, **addr)
    assert rel_err(out, ref) < TOL[torch.bfloat16], "decode"
    q_lens = [1, 17, 2048, 300, 333, 1, 5, 700]  # chunks ending each sequence
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    out = triton_ops.prefill_attention(q, k, v, qsl, seq_lens, window=window, **addr)
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), qsl, seq_lens, window=window, **addr)
    assert rel_err(out, ref) < TOL[torch.bfloat16], "prefill"


@pytest.mark.gpu
def test_gpu_decode_replays_under_cuda_graph():
    """Capture write_kv + decode once (validate=False), then replay with longer sequences and
    new block tables written into the same buffers: the engine's decode step."""
    heads, kv_heads, head_dim, block_size, batch, max_blocks = 32, 8, 128, 16, 4, 64
    dtype = torch.bfloat16
    num_blocks = batch * max_blocks
    k = torch.randn(num_blocks * block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, max_blocks).to(torch.int32)
    seq_lens = torch.tensor([1, 50, 700, 0], dtype=torch.int32, device="cuda")  # last row: padding
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    new_k, new_v = torch.randn(batch, kv_heads, head_dim, device="cuda", dtype=dtype), torch.randn(batch, kv_heads, head_dim, device="cuda", dtype=dtype)
    slots = torch.full((batch,), -1, dtype=torch.int64, device="cuda")

    def step() -> torch.Tensor:
        triton_ops.write_kv(new_k, new_v, k, v, slots, validate=False)
        return triton_ops.decode_attention(q, k, v, seq_lens, block_tables=tables, block_size=block_size,
                                           max_seq_len=max_blocks * block_size, validate=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([2, 51, 701, 0], [1000, 1, 1023, 0]):
        seq_lens.copy_(torch.tensor(lens, device="cuda"))
        tables.copy_(torch.randperm(num_blocks, device="cuda").view(batch, max_blocks))
        q.copy_(torch.randn_like(q))
        new_k.copy_(torch.randn_like(new_k))
        new_v.copy_(torch.randn_like(new_v))
        pos = (seq_lens - 1).clamp_min(0).long()
        blocks = tables.gather(1, (pos // block_size).unsqueeze(1)).squeeze(1).long()
        slots.copy_(torch.where(seq_lens > 0, blocks * block_size + pos % block_size, -1))
        graph.replay()
        live = slice(0, 3)
        ref = reference.decode_attention(q[live].float(), k.float(), v.float(), seq_lens[live],
                                         block_tables=tables[live], block_size=block_size)
        err = rel_err(out[live], ref)
        print(f"graph replay {lens}: rel err {err:.2e}")
        assert err < 1e-2
        assert torch.equal(k[slots[0]], new_k[0]) and torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.gpu
@pytest.mark.parametrize("key_dtype, cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_gpu_write_kv(key_dtype, cache_dtype):
    k = torch.randn(50000, 8, 128, device="cuda").to(cache_dtype)
    v = torch.randn_like(k)
    k_ref, v_ref = k.clone(), v.clone()
    key = torch.randn(3000, 8, 128, device="cuda", dtype=key_dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(50000, device="cuda")[:3000]
    slots[::7] = -1
    triton_ops.write_kv(key, value, k, v, slots)
    reference.write_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.gpu
def test_gpu_copy_blocks():
    cache = torch.randn(4, 2, 512 * 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    expected = cache.clone()
    src, dst = torch.arange(0, 100, 2), torch.arange(300, 350)
    triton_ops.copy_blocks(cache, src, dst, 16)
    reference.copy_blocks(expected, src, dst, 16)
    assert torch.equal(cache, expected)


@pytest.mark.gpu
def test_gpu_swap_blocks_through_pinned_memory():
    """Swap out to a pinned CPU cache and back in, through the GPU copy kernel."""
    gpu = torch.randn(3, 2, 256 * 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    cpu = torch.zeros(3, 2, 64 * 16, 8, 128, dtype=torch.bfloat16).pin_memory()
    cpu_ref = cpu.clone()
    out_blocks, cpu_blocks = torch.tensor([5, 200, 17]), torch.tensor([63, 0, 9])
    triton_ops.swap_blocks(gpu, cpu, out_blocks, cpu_blocks, 16)
    torch.cuda.synchronize()
    reference.swap_blocks(gpu, cpu_ref, out_blocks, cpu_blocks, 16)
    assert torch.equal(cpu, cpu_ref)
    back = torch.zeros_like(gpu)
    back_ref = torch.zeros_like(gpu)
    triton_ops.swap_blocks(cpu, back, cpu_blocks, out_blocks, 16)
    reference.swap_blocks(cpu, back_ref, cpu_blocks, out_blocks, 16)
    assert torch.equal(back, back_ref) and torch.equal(back[:, :, 5 * 16:6 * 16], gpu[:, :, 5 * 16:6 * 16])


# ------------------------------------------------- the elementwise layers (also used on the CPU
# by test_kernels_interpreter.py): agreement with the torch reference in ulps

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Distance of each element from the reference in units in the last place of their dtype."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(_BITS[x.dtype]).long()
        magnitude = bits & ((1 << (8 * x.element_size() - 1)) - 1)
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(out) - ordered(ref)).abs()


# Largest ulp distance allowed: a float32 sum in another order (the mean of squares), or another
# exp (numpy's on the interpreter), moves a float32 result by a few ulps. A 16-bit normed value
# then lands at most 1 ulp off, which the weight can turn into 2 ulps of a smaller product.
MAX_ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


def layer_stats(out: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (out.float() - ref.float()).abs()
    return (f"max |diff| {diff.max().item():.2e}, rel err {rel_err(out, ref):.2e}, "
            f"max {int(ulps(out, ref).max())} ulp, {100 * (out == ref).float().mean().item():.3f}% identical")


def assert_close_ulps(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within MAX_ULPS; 16-bit results also identical but for 1% (a rounding point missed,
    such as the normed value's before the weight, makes about a quarter differ)."""
    distance = ulps(out, ref)
    assert int(distance.max()) <= MAX_ULPS[ref.dtype], f"{int(distance.max())} ulps apart"
    if ref.dtype != torch.float32:
        assert (distance == 0).float().mean() >= 0.99


# A normed value a few ulps off moves each product of the rotation by about as much, and the
# two products' sum can cancel: bound the error by the products' magnitudes, not the result's.
ROPE_ULPS = {torch.float32: 16, torch.float16: 3, torch.bfloat16: 3}


def assert_rotary_close(out: torch.Tensor, ref: torch.Tensor, normed: torch.Tensor) -> None:
    """``|out - ref| <= n ulps of |x| + |rotate_half(x)|`` (cos and sin are at most 1); 16-bit
    results identical but for 1%, as in ``assert_close_ulps``."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    mag = normed.float().abs() + normed.float().abs().roll(normed.shape[-1] // 2, dims=-1)
    bound = ROPE_ULPS[ref.dtype] * torch.finfo(ref.dtype).eps * mag
    assert ((out.float() - ref.float()).abs() <= bound).all()
    if ref.dtype != torch.float32:
        assert (out == ref).float().mean() >= 0.99


NORM_CASES = [
    # tokens, hidden, dtype: qwen3-0.6b decode / prefill, llama-3.1-8b prefill, narrow rows, odd widths
    (1, 1024, torch.bfloat16), (256, 1024, torch.bfloat16), (8192, 1024, torch.bfloat16),
    (8192, 4096, torch.bfloat16), (16384, 64, torch.bfloat16), (77, 3000, torch.float16), (300, 2048, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, hidden, dtype", NORM_CASES)
def test_gpu_rms_norms_match_reference(tokens, hidden, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = (4 * torch.randn(tokens, hidden, device="cuda", generator=gen)).to(dtype)
    residual = (4 * torch.randn(tokens, hidden, device="cuda", generator=gen)).to(dtype)
    weight = (1 + torch.randn(hidden, device="cuda", generator=gen) / 4).to(dtype)
    out, ref = triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    print(f"rms_norm {dtype} T={tokens} H={hidden}: {layer_stats(out, ref)}")
    assert_close_ulps(out, ref)
    (out, summed), (ref, ref_summed) = (f(x, residual, weight, 1e-6) for f in (triton_ops.add_rms_norm, reference.add_rms_norm))
    print(f"add_rms_norm {dtype} T={tokens} H={hidden}: {layer_stats(out, ref)}; residual identical: {torch.equal(summed, ref_summed)}")
    assert torch.equal(summed, ref_summed)
    assert_close_ulps(out, ref)


SILU_CASES = [
    # tokens, intermediate, dtype: qwen3-0.6b and llama-3.1-8b decode / prefill, odd widths
    (1, 3072, torch.bfloat16), (256, 3072, torch.bfloat16), (8192, 3072, torch.bfloat16),
    (256, 14336, torch.bfloat16), (8192, 14336, torch.bfloat16), (100, 1000, torch.float16), (64, 3072, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, inter, dtype", SILU_CASES)
def test_gpu_silu_and_mul_matches_reference(tokens, inter, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    gate_up = (3 * torch.randn(tokens, 2 * inter, device="cuda", generator=gen)).to(dtype)
    out, ref = triton_ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up)
    print(f"silu_and_mul {dtype} T={tokens} I={inter}: {layer_stats(out, ref)}")
    assert_close_ulps(out, ref)


def rope_cos_sin(max_pos: int, head_dim: int, dtype: torch.dtype, theta: float = 1e6) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, device="cuda").float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


ROPE_CASES = [
    # tokens, heads, kv_heads, head_dim, q/k norm, dtype: qwen3-0.6b, llama-3.1-8b, llama-3.2-1b, wide heads
    (1, 16, 8, 128, True, torch.bfloat16), (256, 16, 8, 128, True, torch.bfloat16),
    (8192, 16, 8, 128, True, torch.bfloat16), (256, 32, 8, 128, False, torch.bfloat16),
    (16384, 32, 8, 128, False, torch.bfloat16), (300, 32, 8, 64, False, torch.bfloat16),
    (100, 16, 2, 256, True, torch.float16), (50, 16, 8, 128, True, torch.float32), (50, 32, 8, 128, False, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, norm, dtype", ROPE_CASES)
def test_gpu_rotary_embedding_matches_reference(tokens, heads, kv_heads, head_dim, norm, dtype):
    """q and k as views of the fused qkv output, positions in any order. Without the norm every
    rounding is torch's: results are identical."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    qkv = (2 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=gen)).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    cos_sin = rope_cos_sin(40960, head_dim, dtype)
    positions = torch.randint(0, 40960, (tokens,), device="cuda", generator=gen)
    weights = [(1 + torch.randn(head_dim, device="cuda", generator=gen) / 4).to(dtype) for _ in range(2)] if norm else [None, None]
    outs = triton_ops.rotary_embedding(positions, q, k, cos_sin, *weights, 1e-6)
    refs = reference.rotary_embedding(positions, q, k, cos_sin, *weights, 1e-6)
    for name, out, ref, x, weight in zip("qk", outs, refs, (q, k), weights):
        print(f"rotary {name} {dtype} T={tokens} {heads}/{kv_heads}x{head_dim} norm={norm}: {layer_stats(out, ref)}")
        if norm:
            assert_rotary_close(out, ref, reference.rms_norm(x, weight, 1e-6))
        else:
            assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, norm, dtype", ROPE_CASES)
def test_gpu_rotary_write_kv_is_rotary_then_write_kv_bit_for_bit(tokens, heads, kv_heads, head_dim, norm, dtype):
    """The fused launch the model runs, against the two launches it replaces: the same q, the same cache, padding
    slots (-1) skipped."""
    gen = torch.Generator(device="cuda").manual_seed(tokens + 1)
    qkv = (2 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=gen)).to(dtype)
    q, k, v = (x.view(tokens, -1, head_dim) for x in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                  kv_heads * head_dim], dim=-1))
    cos_sin = rope_cos_sin(40960, head_dim, dtype)
    positions = torch.randint(0, 40960, (tokens,), device="cuda", generator=gen)
    weights = [(1 + torch.randn(head_dim, device="cuda", generator=gen) / 4).to(dtype) for _ in range(2)] if norm else [None, None]
    slots = torch.randperm(2 * tokens, device="cuda", generator=gen)[:tokens]
    slots[::7] = -1
    k_cache = torch.randn(2 * tokens, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    v_cache = torch.randn(2 * tokens, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    k_two, v_two = k_cache.clone(), v_cache.clone()
    fused_q = triton_ops.rotary_write_kv(positions, q, k, v, cos_sin, *weights, 1e-6, k_cache, v_cache, slots)
    two_q, two_k = triton_ops.rotary_embedding(positions, q, k, cos_sin, *weights, 1e-6)
    triton_ops.write_kv(two_k, v, k_two, v_two, slots)
    assert torch.equal(fused_q, two_q) and torch.equal(k_cache, k_two) and torch.equal(v_cache, v_two)


@pytest.mark.gpu
def test_gpu_layers_replay_under_cuda_graph():
    """The four layers captured once, replayed on new inputs written into the same buffers."""
    tokens, hidden, inter, heads, kv_heads, head_dim = 64, 1024, 3072, 16, 8, 128
    dtype = torch.bfloat16
    x = torch.empty(tokens, hidden, device="cuda", dtype=dtype)
    residual, gate_up = torch.empty_like(x), torch.empty(tokens, 2 * inter, device="cuda", dtype=dtype)
    qkv = torch.empty(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    positions = torch.empty(tokens, dtype=torch.int64, device="cuda")
    weight, head_weight = torch.randn(hidden, device="cuda").to(dtype), torch.randn(head_dim, device="cuda").to(dtype)
    cos_sin = rope_cos_sin(4096, head_dim, dtype)

    def step(ops):
        q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
        return (*ops.add_rms_norm(x, residual, weight, 1e-6), ops.silu_and_mul(gate_up),
                *ops.rotary_embedding(positions, q, k, cos_sin, head_weight, head_weight, 1e-6))

    def refill():
        for t in (x, residual, gate_up, qkv):
            t.copy_(torch.randn(t.shape, device="cuda"))
        positions.copy_(torch.randint(0, 4096, (tokens,), device="cuda"))

    refill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(triton_ops)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(triton_ops)
    for _ in range(2):
        refill()
        graph.replay()
        for out, ref in zip(outs, step(reference)):
            assert (out.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()


@pytest.mark.gpu
def test_gpu_tiny_qwen3_same_logits_with_triton_layers(tiny_model):
    """The whole model (q/k norm, every layer kernel, Triton attention) on both backends, a
    prefill then decode steps over the cache it wrote: float32 logits agree closely, and in bf16
    the Triton backend strays from the float32 logits no further than the torch backend does."""
    from engines.model.loader import load_model
    from engines.model.reference import forward_once

    path = tiny_model("tiny-qwen3")
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = {}
    for backend in ("triton", "torch"):
        for dtype in ("float32", "bfloat16"):
            model = load_model(path, dtype=dtype, device="cuda", attn_backend=backend)
            cache = model.allocate_kv_cache(len(ids) + 3)
            steps = [forward_once(model, cache, ids, 0)]
            steps += [forward_once(model, cache, [ids[i]], len(ids) + i) for i in range(3)]
            logits[backend, dtype] = torch.stack(steps)
    exact = logits["torch", "float32"]
    fp32_err = rel_err(logits["triton", "float32"], exact)
    bf16_err = {b: rel_err(logits[b, "bfloat16"], exact) for b in ("triton", "torch")}
    print(f"tiny-qwen3 logits, triton vs torch backend: float32 rel err {fp32_err:.2e}; bf16 vs float32: "
          f"triton {bf16_err['triton']:.2e}, torch {bf16_err['torch']:.2e}; "
          f"bf16 triton vs torch {rel_err(logits['triton', 'bfloat16'], logits['torch', 'bfloat16']):.2e}")
    assert fp32_err < 1e-4
    assert bf16_err["triton"] < 2 * bf16_err["torch"]


def test_repeater_refuses_what_was_not_recorded():
    """No launch, or one the interpreter made (recorded as None): no repeater, the caller runs its call again."""
    from kernels.triton_common import repeater

    planes = (torch.empty(4, 2, 8), torch.empty(4, 2, 8))
    assert repeater([], planes) is None
    assert repeater([None], planes) is None


@pytest.mark.gpu
def test_gpu_launch_reuses_a_compiled_kernel_only_for_its_specialization(monkeypatch):
    """``launch`` relaunches the kernel Triton compiled for the same specialization without going through Triton: a
    second call of the same arguments does not reach Triton's path, a tensor at an address that is not a multiple of
    16 (which Triton compiles without that assumption) does, once, and gets a kernel of its own; every call gives the
    reference's result. With a profiler's launch hook set, every launch goes through Triton, which calls it."""
    import triton

    from kernels.triton_layers import _silu_and_mul_kernel

    monkeypatch.setattr(triton_common, "_COMPILED", {})  # as in a process that has not launched it yet
    through_triton = []
    tritons_run = _silu_and_mul_kernel.run

    def counted(*args, **kwargs):
        through_triton.append(kwargs["grid"])
        return tritons_run(*args, **kwargs)

    monkeypatch.setattr(_silu_and_mul_kernel, "run", counted)
    base = torch.randn(4 * 256 + 1, device="cuda", dtype=torch.bfloat16)
    aligned, shifted = base[:1024].view(4, 256), base[1:1025].view(4, 256)
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0
    for x, via_triton in ((aligned, 1), (aligned, 1), (shifted, 2), (shifted, 2)):
        assert torch.equal(triton_ops.silu_and_mul(x), reference.silu_and_mul(x))
        assert len(through_triton) == via_triton
    kernels = {id(c) for c, _ in triton_common._COMPILED.values()}
    assert len(kernels) == 2
    hooked = []
    triton.knobs.runtime.launch_enter_hook.add(hooked.append)
    try:
        triton_ops.silu_and_mul(aligned)
        triton_ops.silu_and_mul(aligned)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hooked.append)
    assert len(hooked) == 2 and len(through_triton) == 4


def test_launch_reaches_triton_only_for_a_new_specialization(monkeypatch):
    """``launch``'s cache on the CPU, with Triton's path and the compiled kernel's launcher faked: the same keys go
    straight to the launcher (current stream, every argument in signature order); a misaligned tensor, an int no
    longer a multiple of 16, a keyword of another type (``X=1`` after ``X=True``, which Triton compiles apart though
    they hash equal), an unhashable keyword or a profiler's hook go through Triton; a positional constexpr is
    refused."""
    import triton
    import triton.language as tl
    from triton.compiler.compiler import CompiledKernel

    @triton.jit
    def kernel(x_ptr, n, X: tl.constexpr, Y: tl.constexpr = 3):
        pass

    class Compiled(CompiledKernel):
        function = packed_metadata = None

        def __init__(self):  # noqa: D107 - no module to load
            self.launched = []

        def run(self, *args):
            self.launched.append(args)

    through_triton = []

    def tritons_path(*args, grid, warmup, **kwargs):
        through_triton.append((args, kwargs))
        return Compiled()

    monkeypatch.setattr(kernel, "run", tritons_path)
    monkeypatch.setattr(triton_common, "_COMPILED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    t = torch.zeros(64)
    launch = triton_common.launch
    launch(kernel, (2,), t, 16, X=True)
    first = triton_common._COMPILED[next(iter(triton_common._COMPILED))][0]
    launch(kernel, (2,), t, 32, X=True)  # 32: a multiple of 16 as well
    assert len(through_triton) == 1
    assert first.launched == [(2, 1, 1, 7, None, None, None, None, None, t, 32, True, 3)]
    for args, kwargs in (((t[1:], 16), {"X": True}), ((t, 17), {"X": True}), ((t, 16), {"X": 1}),
                         ((t, 16), {"X": [1]}), ((t, 16), {"X": [1]})):
        launch(kernel, (2,), *args, **kwargs)
    assert len(through_triton) == 6 and len(first.launched) == 1
    launch(kernel, (2,), t, 16, X=1)  # cached by now
    assert len(through_triton) == 6
    triton.knobs.runtime.launch_enter_hook.add(print)
    try:
        launch(kernel, (2,), t, 16, X=True)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(print)
    assert len(through_triton) == 7 and len(first.launched) == 1
    with pytest.raises(TypeError, match="constexprs by keyword"):
        launch(kernel, (2,), t, 5, True)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
@pytest.mark.parametrize("decodes, chunks", [([1500] * 8, []), ([3, 4000], [(100, 700), (0, 33)]), ([], [(0, 900)])])
def test_gpu_repeated_attention_equals_a_call_per_layer(paged, decodes, chunks):
    """One mixed step's attention (decodes split over the KV range or not, prompt chunks), recorded over layer 0's
    planes and repeated over layers 1-3 through the compiled kernels, with new queries written into the same
    buffer each time: every layer's output equals a call of its own."""
    lens = decodes + [c + q for c, q in chunks]
    k0, v0, addr, gen = gpu_case(lens, 32, 8, 128, torch.bfloat16, 16, paged, seed=2)
    layers = [(k0, v0)] + [(torch.randn_like(k0), torch.randn_like(v0)) for _ in range(3)]
    n, q_lens = len(decodes), [q for _, q in chunks]
    tokens = n + sum(q_lens)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    dec = {key: t[:n] for key, t in addr.items() if isinstance(t, torch.Tensor)}
    pre = {key: t[n:] for key, t in addr.items() if isinstance(t, torch.Tensor)}
    size = {key: t for key, t in addr.items() if not isinstance(t, torch.Tensor)}
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    q, out = (torch.empty(tokens, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def attend(k, v):
        if n:
            triton_ops.decode_attention(q[:n], k, v, seq_lens[:n], **dec, **size, max_seq_len=max(lens),
                                        validate=False, out=out[:n])
        if chunks:
            triton_ops.prefill_attention(q[n:], k, v, qsl, seq_lens[n:], **pre, **size, max_query_len=max(q_lens),
                                         max_seq_len=max(lens), validate=False, out=out[n:])

    again = None
    for i, (k, v) in enumerate(layers):
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
        if i == 0:
            again = triton_ops.repeatable(attend, k, v)
            assert again is not attend  # the compiled kernels repeat
        else:
            again(k, v)
        got = out.clone()
        attend(k, v)
        assert torch.equal(got, out), f"layer {i}"
    with pytest.raises(ValueError, match="shape, strides"):
        again(k0[:-1], v0[:-1])


def test_repeater_swaps_exactly_the_recorded_planes():
    """Fake compiled kernels record what they are launched with: each repeat passes the recorded arguments with
    the planes (found by identity, wherever they stand) swapped, and the other arguments, buffers included, as
    they were."""
    from kernels.triton_common import Launch, repeater

    calls = []

    class Compiled:  # as much of a CompiledKernel as a launch reads
        function = packed_metadata = None

        def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
            calls.append(((gx, gy, gz), args, stream))

    k0, v0, q, part = torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(3, 2, 8), torch.zeros(3)
    launches = [Launch(Compiled(), (3, 2, 1), [q, k0, v0, 1.5, part, 16]),
                Launch(Compiled(), (3, 1, 1), [part, q, 7]),
                Launch(Compiled(), (2, 1, 1), [v0, q, k0])]
    again = repeater(launches, (k0, v0))
    k1, v1 = torch.ones(4, 2, 8), torch.ones(4, 2, 8)
    again(k1, v1)
    assert [grid for grid, _, _ in calls] == [(3, 2, 1), (3, 1, 1), (2, 1, 1)]
    expected = [[q, k1, v1, 1.5, part, 16], [part, q, 7], [v1, q, k1]]
    for (_, args, stream), want in zip(calls, expected):
        assert stream is None and len(args) == len(want)
        assert all(a is w if isinstance(w, torch.Tensor) else a == w for a, w in zip(args, want))
    with pytest.raises(ValueError, match="shape, strides"):
        again(k1.double(), v1)


def _jit_kernels_and_launches() -> tuple[dict[str, ast.FunctionDef], list[tuple[str, ast.Call]]]:
    """Every @triton.jit function of the Triton backend's modules, and every launch of one: ``launch(K, grid, ...)``
    or ``K[grid](...)``, with the name of K."""
    kernels_dir = Path(triton_common.__file__).parent
    jitted, launches = {}, []
    for path in sorted(kernels_dir.glob("triton_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                jitted[node.name] = node
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Name) and node.func.id == "launch" and node.args:
                    launches.append((ast.unparse(node.args[0]), node))
                elif isinstance(node.func, ast.Subscript):
                    launches.append((ast.unparse(node.func.value), node))
    return jitted, launches


def test_every_kernel_that_may_launch_as_a_programmatic_dependent_waits_for_its_inputs_first():
    """The one mistake that would race: a kernel launched with ``launch_pdl`` that touches memory before
    ``griddepcontrol.wait``. So every kernel with a ``PDL`` parameter starts with ``wait_for_inputs(PDL)``, every
    launch of one takes ``**pdl_options(...)`` (the constexpr and the launch option together), and nothing else sets
    ``launch_pdl``."""
    jitted, launches = _jit_kernels_and_launches()
    dependents = {name for name, fn in jitted.items()
                  if "PDL" in [a.arg for a in fn.args.args] and name != "wait_for_inputs"}
    assert {"_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel", "_write_kv_kernel", "_decode_split_kernel",
            "_decode_merge_kernel", "_prefill_kernel"} <= dependents
    for name in dependents:
        body = jitted[name].body
        body = body[1:] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body
        assert ast.unparse(body[0]) == "wait_for_inputs(PDL)", f"{name} does not start by waiting for its inputs"
    launched = {name for name, _ in launches}
    assert dependents <= launched
    for name, call in launches:
        spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        named = {k.arg for k in call.keywords}
        assert not {"PDL", "launch_pdl"} & named, f"{name} sets PDL or launch_pdl by hand"
        assert any(s.startswith("pdl_options(") for s in spread) == (name in dependents), name


def test_programmatic_launch_is_off_the_gpu():
    assert not triton_common.programmatic_launch(torch.device("cpu"))
    assert triton_common.pdl_options(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}


def test_linear_off_a_graph_is_torchs():
    """Outside a CUDA graph's capture (and on the CPU) ``linear`` is cuBLAS's, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    assert torch.equal(triton_ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_skinny_linear_tiles_depend_on_the_weight_alone(monkeypatch):
    """On 132 SMs: qwen3-0.6b's qkv and gate_up unsplit, its o and down K in four (64 programs each); llama-3.1-8b's
    wide projections unsplit."""
    from kernels import triton_linear

    monkeypatch.setattr(triton_linear, "sm_count", lambda device: 132)
    dev = torch.device("cuda")
    splits = {shape: triton_linear.choose_tiles(*shape, dev).split_k
              for shape in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (28672, 4096), (4096, 14336))}
    assert list(splits.values()) == [1, 4, 1, 4, 1, 1]


def test_skinny_linear_never_allocates_its_counters_inside_a_capture(monkeypatch):
    """A capture would record the counters' allocation and zeroing instead of doing them: one that finds none is
    refused with what to do, and so is a launch with more output tiles than the counters."""
    from kernels import triton_linear

    monkeypatch.setattr(triton_linear, "_TICKETS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(KernelArgumentError, match=r"call triton_linear.reserve\(device\)"):
        triton_linear._tickets(torch.device("cuda", 0), 4)
    with pytest.raises(KernelArgumentError, match="4097 output tiles, more than its 4096 ticket counters"):
        triton_linear._tickets(torch.device("cpu"), triton_linear.MAX_TILES + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (1536, 896)])
def test_gpu_skinny_linear_is_as_accurate_as_cublas_and_batch_invariant(n, k):
    """Against float32, each decode-sized batch's error is cuBLAS's (within 10%), with and without a bias; with the
    SwiGLU epilogue it equals ``silu_and_mul`` of the plain result bit for bit; and each row is its one-row result
    bit for bit, at every batch size up to 64."""
    from kernels.triton_linear import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16)
    x = torch.randn(64, k, device="cuda", generator=gen).to(torch.bfloat16)
    alone = torch.stack([skinny_linear(x[i:i + 1], w)[0] for i in range(64)])
    for m in (1, 7, 16, 33, 64):
        for bias in (None, b):
            want = torch.nn.functional.linear(x[:m].float(), w.float(), None if bias is None else bias.float())
            err = lambda y: ((y.float() - want).norm() / want.norm()).item()  # noqa: E731
            got = skinny_linear(x[:m], w, bias)
            assert err(got) <= 1.1 * err(torch.nn.functional.linear(x[:m], w, bias)) + 1e-4, (m, bias is None)
            assert torch.equal(skinny_linear(x[:m], w, bias, silu_and_mul=True), triton_ops.silu_and_mul(got))
        assert torch.equal(skinny_linear(x[:m], w), alone[:m]), m
    with pytest.raises(KernelArgumentError, match="fp16 or bf16 on CUDA"):  # float32 would run as TF32
        skinny_linear(x.float(), w.float())


@pytest.mark.gpu
def test_gpu_linear_takes_the_skinny_kernel_in_a_graph_capture_only(monkeypatch):
    """Captured, a decode-sized bf16 ``linear`` (and ``linear_silu_and_mul``) launches our kernel on sm_90+ (cuBLAS
    above 64 rows, for float32, or before Hopper); eagerly it is cuBLAS's, and it reserves the kernel's ticket
    counters for the captures to come; a capture before any such eager call keeps cuBLAS. The graph's replays give
    the kernel's result."""
    from kernels import triton_linear
    from kernels.triton_linear import skinny_linear

    monkeypatch.setattr(triton_linear, "_TICKETS", {})  # as in a process that has not run the kernel yet
    gen = torch.Generator(device="cuda").manual_seed(9)
    w = torch.randn(256, 128, device="cuda", generator=gen).to(torch.bfloat16)
    small, big = (torch.randn(m, 128, device="cuda", generator=gen).to(torch.bfloat16) for m in (8, 65))
    hopper = torch.cuda.get_device_capability() >= (9, 0)

    def captured_kernels() -> list[str]:
        graph = torch.cuda.CUDAGraph()
        with triton_common.recording() as captured, torch.cuda.graph(graph):
            triton_ops.linear(small, w)
        return [x.compiled.name for x in captured]

    assert captured_kernels() == [] and not triton_linear.reserved(small.device)
    with triton_common.recording() as eager:
        triton_ops.linear(small, w)
    assert eager == [] and triton_linear.reserved(small.device) == hopper
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        skinny_linear(small, w), skinny_linear(small, w, silu_and_mul=True)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    assert captured_kernels() == (["_linear_kernel"] if hopper else [])
    graph = torch.cuda.CUDAGraph()
    with triton_common.recording() as captured, torch.cuda.graph(graph):
        outs = [triton_ops.linear(small, w), triton_ops.linear(big, w), triton_ops.linear(small.float(), w.float()),
                triton_ops.linear_silu_and_mul(small, w), triton_ops.linear_silu_and_mul(big, w)]
    skinny = [x.compiled.name for x in captured if x.compiled.name == "_linear_kernel"]
    assert len(skinny) == (2 if hopper else 0)
    small.copy_(torch.randn(small.shape, device="cuda", generator=gen))
    graph.replay()
    assert torch.equal(outs[0], skinny_linear(small, w) if hopper else torch.nn.functional.linear(small, w))
    assert torch.equal(outs[1], torch.nn.functional.linear(big, w))
    assert torch.equal(outs[3], triton_ops.silu_and_mul(outs[0]))
    assert torch.equal(outs[4], triton_ops.silu_and_mul(outs[1]))


@pytest.mark.gpu
def test_gpu_model_step_kernels_launch_as_programmatic_dependents_on_hopper():
    """On sm_90 and later every kernel of a model step is compiled with ``launch_pdl``, and its code waits
    (``griddepcontrol.wait``) before its first global memory access."""
    from kernels.triton_linear import skinny_linear

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    dev = torch.device("cuda")
    q = torch.randn(2, 4, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1024, 2, 64, device=dev, dtype=torch.bfloat16)  # room for 8 tiles: decode splits and merges
    seq_lens = torch.tensor([900, 7], dtype=torch.int32, device=dev)
    starts = torch.tensor([0, 900], dtype=torch.int32, device=dev)
    x = torch.randn(3, 256, device=dev, dtype=torch.bfloat16)
    w = torch.ones(256, device=dev, dtype=torch.bfloat16)
    with triton_common.recording() as launches:
        triton_ops.decode_attention(q, k, k, seq_lens, seq_starts=starts, max_seq_len=4096, validate=False)
        triton_ops.prefill_attention(q, k, k, torch.tensor([0, 1, 2], dtype=torch.int32, device=dev), seq_lens,
                                     seq_starts=starts, validate=False)
        triton_ops.add_rms_norm(x, x, w, 1e-6)
        triton_ops.silu_and_mul(x)
        triton_ops.write_kv(k[:2], k[:2], k, k, torch.tensor([5, 9], device=dev), validate=False)
        cos_sin = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
        triton_ops.rotary_embedding(torch.tensor([1, 2], device=dev), q, k[:2], cos_sin)
        wide = torch.randn(3, 1024, device=dev, dtype=torch.bfloat16)  # K split in four: the partials' path too
        skinny_linear(wide, torch.ones(512, 1024, device=dev, dtype=torch.bfloat16))
        skinny_linear(wide, torch.ones(512, 1024, device=dev, dtype=torch.bfloat16), silu_and_mul=True)
    names = {x.compiled.name for x in launches}
    assert {"_decode_split_kernel", "_decode_merge_kernel", "_prefill_kernel", "_rms_norm_kernel",
            "_silu_and_mul_kernel", "_write_kv_kernel", "_rotary_kernel", "_linear_kernel"} <= names, names
    for x in launches:
        ptx = x.compiled.asm["ptx"]
        body = ptx[ptx.index("griddepcontrol.wait"):]
        assert x.compiled.metadata.launch_pdl, x.compiled.name
        assert "ld.global" not in ptx[:len(ptx) - len(body)] and "st.global" not in ptx[:len(ptx) - len(body)]
