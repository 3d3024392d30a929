"""The Triton backend: its contract with the reference (CPU, no launch) and, on a GPU, every
kernel against its fp32 reference at real shapes (errors printed; run with -s to see them).

The CPU runs of the kernels themselves live in test_kernels_interpreter.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from kernels import KernelArgumentError, load_backend, reference

triton_ops = pytest.importorskip("kernels.triton_ops")

FUNCTIONS = ("write_kv", "prefill_attention", "decode_attention", "copy_blocks", "swap_blocks")


def test_same_functions_and_signatures_as_reference():
    for name in FUNCTIONS:
        assert inspect.signature(getattr(triton_ops, name)) == inspect.signature(getattr(reference, name)), name


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
