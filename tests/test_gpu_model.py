"""On a GPU, at real shapes: our model against transformers, and the engines against one-at-a-time output.

Run with ``pytest -m gpu -s`` to see the measured errors.
"""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.model.loader import load_model
from engines.model.reference import forward_once, greedy_generate
from engines.request import Request, SamplingParams
from harness.models.make_model import ensure_model

pytestmark = pytest.mark.gpu


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(count)]


def hf_last_logits(path, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
    del model
    free_cuda()
    return out


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama-3.1-8b"])
def test_bf16_logits_within_bf16_tolerance(preset):
    """Both bf16 implementations against transformers in fp32: ours may not stray much further than theirs."""
    path = ensure_model(preset)
    ids = prompts(1, 200)[0]
    exact = hf_last_logits(path, ids, torch.float32)
    theirs = hf_last_logits(path, ids, torch.bfloat16)
    rel = lambda x: ((x - exact).norm() / exact.norm()).item()
    print(f"\n{preset}: transformers bf16 vs fp32: relative error {rel(theirs):.2e}")
    for backend in ("triton", "torch"):
        ours = load_model(path, dtype="bfloat16", device="cuda", attn_backend=backend)
        cache = ours.allocate_kv_cache(len(ids))
        got = forward_once(ours, cache, ids, 0)
        print(f"{preset}: ours bf16 ({backend} kernels) vs fp32: relative error {rel(got):.2e}; "
              f"vs transformers bf16: {((got - theirs).norm() / theirs.norm()).item():.2e}")
        assert rel(got) < max(2 * rel(theirs), 1e-2)
        del ours, cache
        free_cuda()


@torch.no_grad()
def test_bf16_decode_step_replayed_with_our_gemm_is_as_accurate_as_eager():
    """A bf16 decode step of 16 sequences, replayed from a CUDA graph (on Hopper its linear layers take
    ``kernels.triton_linear``) and run eagerly (cuBLAS), each against the same step in float32: the graph's error is
    the eager step's, within 20%."""
    from engines.kv.metadata import StepSequence, build_metadata
    from kernels import triton_common

    path = ensure_model("qwen3-0.6b")
    batch, length = 16, 120
    starts = np.arange(batch, dtype=np.int32) * (length + 1)
    tokens = prompts(batch, length + 1, seed=5)

    def decode_logits(dtype: str, graphed: bool) -> tuple[torch.Tensor, list[str], int]:
        model = load_model(path, dtype=dtype, device="cuda")
        layers = model.cfg.num_layers
        cache = model.allocate_kv_cache(batch * (length + 1))
        for i, p in enumerate(tokens):  # each prompt prefilled at its own region
            meta = build_metadata([StepSequence(0, length)], starts[i] + np.arange(length), block_tables=None,
                                  seq_starts=starts[i:i + 1], block_size=1, device=model.device)
            model(torch.tensor(p[:length], device="cuda"), torch.arange(length, device="cuda"), cache, meta)
        meta = build_metadata([StepSequence(length, 1)] * batch, starts + length, block_tables=None,
                              seq_starts=starts, block_size=1, device=model.device)
        ids = torch.tensor([p[length] for p in tokens], device="cuda")
        positions = torch.full((batch,), length, device="cuda")
        step = lambda: model(ids, positions, cache, meta)  # noqa: E731
        kernels: list[str] = []
        if graphed:
            for _ in range(2):  # the warm-up the engines run before a capture
                step()
            graph = torch.cuda.CUDAGraph()
            with triton_common.recording() as launches, torch.cuda.graph(graph):
                hidden = step()
            graph.replay()
            kernels = [x.compiled.name for x in launches if x is not None]
        else:
            hidden = step()
        logits = model.compute_logits(hidden)
        del model, cache
        free_cuda()
        return logits, kernels, layers

    exact, _, _ = decode_logits("float32", graphed=False)
    eager, _, _ = decode_logits("bfloat16", graphed=False)
    replayed, kernels, layers = decode_logits("bfloat16", graphed=True)
    rel = lambda x: ((x - exact).norm() / exact.norm()).item()  # noqa: E731
    print(f"\nbf16 decode step vs fp32: eager (cuBLAS) {rel(eager):.2e}, replayed ({kernels.count('_linear_kernel')} "
          f"launches of our GEMM) {rel(replayed):.2e}")
    if torch.cuda.get_device_capability() >= (9, 0):
        assert kernels.count("_linear_kernel") == 4 * layers  # each layer's four projections
    assert rel(replayed) <= 1.2 * rel(eager)


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama-3.1-8b"])
def test_fp32_greedy_matches_transformers(preset):
    path = ensure_model(preset)
    batch = prompts(8, 32, seed=1)  # equal lengths: no padding in transformers' batch
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        ref = theirs.generate(torch.tensor(batch, device="cuda"), max_new_tokens=64, do_sample=False,
                              eos_token_id=None, attention_mask=torch.ones(8, 32, dtype=torch.long, device="cuda"))
    ref = ref[:, 32:].tolist()
    del theirs
    free_cuda()
    ours = load_model(path, dtype="float32", device="cuda")
    got = [greedy_generate(ours, p, 64) for p in batch]
    del ours
    free_cuda()
    agree = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), 64) for g, r in zip(got, ref)]
    print(f"\n{preset} fp32 greedy, tokens agreeing before the first difference per prompt: {agree}")
    assert agree == [64] * 8


ENGINE_CASES = {
    "paged16": PagedConfig(block_size=16, dtype="float32"),
    "paged1": PagedConfig(block_size=1, dtype="float32"),
    "paged256": PagedConfig(block_size=256, dtype="float32"),
    "paged-chunked": PagedConfig(block_size=16, dtype="float32", max_num_batched_tokens=64, max_num_seqs=32),
    # steps with prompt chunks run eagerly (every other case replays them as piecewise graphs)
    "paged-eager-mixed": PagedConfig(block_size=16, dtype="float32", cuda_graph_max_tokens=0),
    "paged-multistep": PagedConfig(block_size=16, dtype="float32", num_scheduler_steps=8),
    "paged-recompute": PagedConfig(block_size=16, dtype="float32", num_blocks=120),
    "paged-swap": PagedConfig(block_size=16, dtype="float32", num_blocks=120, preemption_mode="swap", swap_space=1.0),
    "contiguous": ContiguousConfig(reservation="pow2", dtype="float32"),
    # fp32 qwen3-0.6b: 512 tokens a 2 MiB page; CUDA graphs (padding rows), deferred and immediate unmaps
    "vattention": VAttentionConfig(dtype="float32", max_model_len=1024),
    "vattention-eager-unmap": VAttentionConfig(dtype="float32", max_model_len=1024, num_kv_slots=8 * 512,
                                               deferred_reclamation=False, max_num_batched_tokens=256),
}


@pytest.fixture(scope="module")
def shared_prefix_workload():
    """32 prompts behind one 96-token system prompt, and their one-at-a-time greedy outputs in fp32."""
    path = ensure_model("qwen3-0.6b")
    rng = random.Random(2)
    prefix = prompts(1, 96, seed=99)[0]  # 6 blocks of 16 for the prefix cache
    batch = [prefix + prompts(1, rng.randint(1, 200), seed=i)[0] for i in range(32)]
    lengths = [rng.randint(1, 64) for _ in batch]
    model = load_model(path, dtype="float32", device="cuda")
    expected = [greedy_generate(model, p, n) for p, n in zip(batch, lengths)]
    del model
    free_cuda()
    return path, batch, lengths, expected


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engines_match_one_at_a_time_on_gpu(name, shared_prefix_workload):
    path, batch, lengths, expected = shared_prefix_workload
    cfg = ENGINE_CASES[name]
    cfg.gpu_memory_utilization = 0.5
    engine = create_engine(path, cfg)
    assert (engine.runner.pieces is None) == (cfg.cuda_graph_max_tokens == 0)
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                for i, (p, n) in enumerate(zip(batch, lengths))]
    got = engine.generate(requests[:1])  # the first publishes the shared prefix; the rest find it cached
    got.update(engine.generate(requests[1:]))
    stats = engine.kv_stats()
    engine.close()
    free_cuda()
    same = sum(got[f"r{i}"][0] == expected[i] for i in range(32))
    print(f"\n{name}: {same}/32 requests equal to one-at-a-time greedy; prefix-cache hits {stats.prefix_cache_hits} "
          f"tokens, preemptions {stats.num_preemptions}, swapped out {stats.num_swapped_out}")
    assert same == 32
    if name.startswith("paged") and name != "paged256":  # a 256-token block is longer than the 96-token prefix
        assert stats.prefix_cache_hits > 0
    if name in ("paged-recompute", "paged-swap"):
        assert stats.num_preemptions > 0
