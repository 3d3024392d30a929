"""Virtual-contiguous KV storage on the real driver: maps, aliases, deferred unmaps, and kernels on it."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def storage():
    from engines.kv.cuda_vmm import CudaPageStorage, granularity
    from engines.kv.storage import PageGeometry

    device = torch.device("cuda")
    token_bytes = 2 * 64 * 2  # 2 KV heads x head dim 64, bf16
    per_page = granularity(device) // token_bytes
    geometry = PageGeometry(1, 2, 2 * per_page, per_page, token_bytes)
    s = CudaPageStorage(geometry, 3, (1, 2, geometry.plane_tokens, 2, 64), torch.bfloat16, device)
    yield s
    s.close()


def test_pages_map_into_one_tensor_and_a_group_can_back_two_addresses(storage):
    g = storage.geometry
    storage.apply([], [(0, 0, 0), (1, 1, 1)])
    k = storage.tensor[0, 0, g.tokens_per_page :]  # after the anchor page
    k[: g.tokens_per_page].fill_(1.5)  # slot 0, page 0 of the K plane: group 0
    k[g.slot_tokens + g.tokens_per_page : 2 * g.slot_tokens].fill_(2.5)  # slot 1, page 1: group 1
    torch.cuda.synchronize()
    storage.apply([(0, 0)], [(1, 0, 0)])  # group 0 moves to slot 1's page 0; slot 0's unmap waits for the device
    torch.cuda.synchronize()
    assert torch.all(k[g.slot_tokens : g.slot_tokens + g.tokens_per_page] == 1.5)  # the same physical memory
    assert torch.all(k[g.slot_tokens + g.tokens_per_page : 2 * g.slot_tokens] == 2.5)
    storage.apply([], [])  # the device is idle: the deferred unmap goes through
    assert not storage._retiring and sorted(storage._mapped.values()) == [0, 0, 1, 1, 3, 3]  # K, V; the anchor


def test_an_address_taken_again_before_its_unmap_came_due_waits_for_it(storage):
    storage.apply([], [(0, 0, 0)])
    storage.apply([(0, 0)], [(0, 0, 2)])
    storage.tensor[0, 0, storage.geometry.tokens_per_page :][:8].fill_(3.0)
    torch.cuda.synchronize()
    assert storage._mapped[storage.geometry.offsets(0, 0)[0]] == 2 and not storage._retiring_at


def test_a_page_size_off_the_granularity_is_refused():
    from engines.kv.cuda_vmm import CudaPageStorage, VMMUnavailable, granularity
    from engines.kv.storage import PageGeometry

    device = torch.device("cuda")
    geometry = PageGeometry(1, 1, 3 * 1024, 3 * 512, 512)  # 768 KiB pages
    assert (3 * 512 * 512) % granularity(device)
    with pytest.raises(VMMUnavailable, match="not a multiple of the driver's allocation granularity"):
        CudaPageStorage(geometry, 1, (1, 2, geometry.plane_tokens, 2, 128), torch.bfloat16, device)


@pytest.mark.parametrize("batch, context", [(1, 700), (8, 4096), (64, 512)])
def test_contiguous_decode_on_driver_pages_equals_it_on_an_ordinary_allocation(batch, context):
    from kernels import triton_ops
    from kernels.bench import HEAD_DIM, HEADS, Cache, VMMCache

    cache = Cache(batch, context, torch.bfloat16, torch.device("cuda"))
    vmm = VMMCache(cache)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    plain = triton_ops.decode_attention(q, cache.k, cache.v, cache.seq_lens, seq_starts=cache.seq_starts)
    paged = triton_ops.decode_attention(q, vmm.k, vmm.v, cache.seq_lens, seq_starts=vmm.seq_starts)
    vmm.storage.close()
    assert torch.equal(plain, paged)


def test_engine_preempts_and_takes_pages_back_on_the_driver_and_stays_exact():
    """qwen3-0.6b in fp32 (512 tokens a 2 MiB page), four page groups, four requests that each grow into a second
    page: sequences are preempted and recomputed, pages unmapped and mapped again, n = 2 samples copy a prompt."""
    from engines import create_engine
    from engines.config import VAttentionConfig
    from engines.model.loader import load_model
    from engines.model.reference import greedy_generate
    from engines.request import Request, SamplingParams
    from harness.models.make_model import ensure_model

    path = ensure_model("qwen3-0.6b")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in (450, 470, 430, 490)]
    model = load_model(path, dtype="float32", device="cuda")
    expected = [greedy_generate(model, p, 120) for p in prompts]
    del model
    engine = create_engine(path, VAttentionConfig(dtype="float32", max_model_len=1024, num_kv_slots=5 * 512,
                                                  max_num_batched_tokens=512))
    try:
        got = engine.generate([Request(f"r{i}", p, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True,
                                                                  n=2 if i == 1 else 1))
                               for i, p in enumerate(prompts)])
        stats, kv = engine.kv_stats(), engine.kv
        assert stats.num_preemptions > 0 and kv.num_unmaps > 0
        assert all(got[f"r{i}"][0] == expected[i] for i in range(4)) and got["r1"][1] == expected[1]
    finally:
        engine.close()
