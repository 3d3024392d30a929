"""On a GPU, at real shapes: our model against transformers, and the engines against one-at-a-time output.

Run with ``pytest -m gpu -s`` to see the measured errors.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig
from engines.model.loader import load_model
from engines.model.reference import forward_once, greedy_generate
from engines.request import Request, SamplingParams
from harness.make_model import ensure_model

pytestmark = pytest.mark.gpu


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(count)]


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama-3.1-8b"])
def test_bf16_logits_close_to_transformers(preset):
    path = ensure_model(preset)
    ids = prompts(1, 200)[0]
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        ref = theirs(torch.tensor([ids], device="cuda")).logits[0, -1].float()
    del theirs
    free_cuda()
    for backend in ("triton", "torch"):
        ours = load_model(path, dtype="bfloat16", device="cuda", attn_backend=backend)
        cache = ours.allocate_kv_cache(len(ids))
        got = forward_once(ours, cache, ids, 0)
        rel = ((got - ref).norm() / ref.norm()).item()
        print(f"\n{preset} bf16 last-token logits, {backend} kernels: relative error {rel:.2e}")
        assert rel < 2e-2
        del ours, cache
        free_cuda()


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


@pytest.mark.parametrize("cfg", [PagedConfig(block_size=16, dtype="float32"), PagedConfig(block_size=1, dtype="float32"),
                                 ContiguousConfig(reservation="pow2", dtype="float32")], ids=["paged16", "paged1", "contig"])
def test_engines_match_one_at_a_time_on_gpu(cfg):
    path = ensure_model("qwen3-0.6b")
    rng = random.Random(2)
    batch = [prompts(1, rng.randint(1, 300), seed=i)[0] for i in range(32)]
    lengths = [rng.randint(1, 64) for _ in batch]
    model = load_model(path, dtype="float32", device="cuda")
    expected = [greedy_generate(model, p, n) for p, n in zip(batch, lengths)]
    del model
    free_cuda()
    cfg.gpu_memory_utilization = 0.5
    engine = create_engine(path, cfg)
    got = engine.generate([Request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                           for i, (p, n) in enumerate(zip(batch, lengths))])
    engine.close()
    free_cuda()
    same = sum(got[f"r{i}"][0] == expected[i] for i in range(32))
    print(f"\n{cfg.name} {getattr(cfg, 'block_size', '')}: {same}/32 requests equal to one-at-a-time greedy")
    assert same == 32
