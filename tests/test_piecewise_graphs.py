"""The piecewise forward (``engines.piecewise_graphs``): its sizes, and its pieces against ``CausalLM.forward``.

On the CPU the pieces run eagerly on the same buffers and padding the CUDA graphs replay (``capture=False``); the
GPU case captures them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engines.kv.metadata import StepSequence, build_metadata
from engines.model.loader import load_model
from engines.piecewise_graphs import PieceBuffers, PiecewiseGraphs, piecewise_sizes


@given(max_tokens=st.integers(1, 20_000), step=st.integers(1, 1024))
def test_sizes_cover_every_count_and_pad_by_less_than_a_step(max_tokens, step):
    sizes = piecewise_sizes(max_tokens, step)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    for n in {1, 7, 8, 9, step - 1, step, step + 1, max_tokens - 1, max_tokens}:
        if 1 <= n <= max_tokens:
            b = next(s for s in sizes if s >= n)
            assert b - n < max(step, n, 8), (n, b)


@pytest.mark.parametrize("bad", [(0, 256), (8, 0)])
def test_sizes_reject_nonpositive_arguments(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        piecewise_sizes(*bad)


def _step(seqs: list[tuple[int, int, int]], block_size: int, table: np.ndarray, device: str = "cpu"):
    """Positions and metadata of a step over ``seqs`` = (row of ``table``, tokens before, new tokens)."""
    slots = np.concatenate([table[row, np.arange(lo, lo + n) // block_size] * block_size + np.arange(lo, lo + n)
                            % block_size for row, lo, n in seqs])
    positions = torch.from_numpy(np.concatenate([np.arange(lo, lo + n) for _, lo, n in seqs])).to(device)
    meta = build_metadata([StepSequence(lo, n) for _, lo, n in seqs], slots,
                          block_tables=table[[row for row, _, _ in seqs]], seq_starts=None, block_size=block_size,
                          device=torch.device(device))
    return positions, meta


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_pieces_equal_the_forward_and_padding_writes_no_kv(tiny_model, preset):
    """Two steps through the pieces, the second smaller at the same padded size (the buffers hold the first's
    slots, ids and attention outputs past it), give the forward's hidden states and leave the same KV cache."""
    model = load_model(tiny_model(preset), dtype="float32")
    block_size, blocks_per_seq = 4, 16
    table = np.random.default_rng(0).permutation(4 * blocks_per_seq).reshape(4, blocks_per_seq).astype(np.int32)
    caches = [model.allocate_kv_cache(4 * blocks_per_seq * block_size) for _ in range(2)]
    graphs = PiecewiseGraphs(model, caches[1], max_tokens=64, step=16, capture=False)
    assert graphs.sizes == [8, 16, 32, 48, 64]
    gen = torch.Generator().manual_seed(0)
    steps = [
        [(0, 0, 30), (1, 0, 10)],  # two prompts: 40 tokens, padded to 48
        [(0, 30, 1), (1, 10, 1), (2, 0, 25), (3, 0, 6)],  # two decodes, then two prompts: 33 tokens, also 48
    ]
    for seqs in steps:
        n = sum(k for _, _, k in seqs)
        ids = torch.randint(0, 1000, (n,), generator=gen)
        positions, meta = _step(seqs, block_size, table)
        with torch.no_grad():
            want = model(ids, positions, caches[0], meta)
            got = graphs.forward(ids, positions, meta)
        assert graphs.padded_size(n) == 48 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-5, atol=1e-5)  # padding rows wrote nothing


def test_buffer_bytes_match_the_buffers(tiny_model):
    model = load_model(tiny_model("tiny-qwen3"), dtype="float32")
    buffers = PieceBuffers.allocate(model, 40)
    assert PieceBuffers.nbytes(model, 40) == sum(t.nbytes for t in vars(buffers).values())
    assert PieceBuffers.nbytes(model, 0) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_captured_pieces_equal_the_forward(dtype):
    """The captured graphs (qwen3-0.6b) against the eager forward, at a mixed step and a smaller one after it."""
    from harness.models.make_model import ensure_model

    model = load_model(ensure_model("qwen3-0.6b"), dtype=dtype, device="cuda")
    block_size, blocks_per_seq = 16, 64
    table = np.random.default_rng(0).permutation(4 * blocks_per_seq).reshape(4, blocks_per_seq).astype(np.int32)
    caches = [model.allocate_kv_cache(4 * blocks_per_seq * block_size) for _ in range(2)]
    graphs = PiecewiseGraphs(model, caches[1], max_tokens=1024, step=256, capture=True)
    gen = torch.Generator().manual_seed(0)
    for seqs in ([(0, 0, 700), (1, 0, 200)], [(0, 700, 1), (1, 200, 1), (2, 0, 500), (3, 0, 300)]):
        n = sum(k for _, _, k in seqs)
        ids = torch.randint(1000, 30000, (n,), generator=gen).cuda()
        positions, meta = _step(seqs, block_size, table, "cuda")
        with torch.no_grad():
            want = model(ids, positions, caches[0], meta)
            got = graphs.forward(ids, positions, meta).clone()
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        print(f"\n{dtype} {n} tokens (padded to {graphs.padded_size(n)}): relative difference {rel:.2e}")
        assert rel < (1e-2 if dtype == "bfloat16" else 1e-5)
    rel = ((caches[1].float() - caches[0].float()).norm() / caches[0].float().norm()).item()
    assert rel < (1e-2 if dtype == "bfloat16" else 1e-5)
