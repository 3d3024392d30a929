"""Every engine against our model's one-request-at-a-time greedy output, and the Engine contract."""

from __future__ import annotations

import random

import pytest

from engines import EngineNotAvailable, create_engine
from engines.config import ContiguousConfig, HFConfig, HFPagedConfig, PagedConfig, VAttentionConfig
from engines.model.loader import load_model
from engines.model.reference import greedy_generate
from engines.request import FinishReason, Request, RequestError, SamplingParams

PRESET = "tiny-qwen3"
N = 32


def make_workload(seed: int = 0, shared_prefix: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(1000) for _ in range(shared_prefix)]
    prompts = [prefix + [rng.randrange(1000) for _ in range(rng.randint(1, 60))] for _ in range(N)]
    lengths = [rng.randint(1, 40) for _ in range(N)]
    return prompts, lengths


def requests(prompts, lengths, **params):
    return [Request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **params))
            for i, (p, n) in enumerate(zip(prompts, lengths))]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model(PRESET)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy outputs, one request at a time, for the plain and the shared-prefix workloads."""
    model = load_model(model_dir)
    out = {}
    for key, workload in (("mixed", make_workload()), ("shared", make_workload(1, shared_prefix=40))):
        prompts, lengths = workload
        out[key] = (prompts, lengths, [greedy_generate(model, p, n) for p, n in zip(prompts, lengths)])
    return out


def run_exact(model_dir, reference, cfg, workload="mixed"):
    prompts, lengths, expected = reference[workload]
    engine = create_engine(model_dir, cfg)
    got = engine.generate(requests(prompts, lengths))
    mismatches = [i for i in range(N) if got[f"r{i}"][0] != expected[i]]
    assert not mismatches, f"{cfg}: requests {mismatches} differ from the reference"
    stats = engine.kv_stats()
    assert stats.allocated == 0 and stats.stored == 0 and engine.ledger.owned == 0, "memory still held after every request finished"
    return stats


@pytest.mark.parametrize("cfg", [
    PagedConfig(block_size=16),
    PagedConfig(block_size=1),
    PagedConfig(block_size=256),
    PagedConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=8),  # several chunks per prompt
    ContiguousConfig(reservation="max", max_model_len=128, num_kv_slots=1024),
    ContiguousConfig(reservation="pow2", num_kv_slots=300),
    ContiguousConfig(reservation="oracle", num_kv_slots=200, allocator="best_fit"),
    ContiguousConfig(reservation="oracle", max_num_batched_tokens=16, max_num_seqs=8),
    PagedConfig(block_size=4, num_scheduler_steps=5, max_num_seqs=12),  # multi-step decode
    ContiguousConfig(reservation="oracle", num_scheduler_steps=8, num_kv_slots=400),  # exact regions
    # tiny-qwen3 in float32: 16 tokens a 4 KiB host page, so most sequences span several (on a CPU also on a GPU
    # machine: the driver's 2 MiB pages are tests/test_gpu_*'s)
    VAttentionConfig(device="cpu", max_model_len=128, num_kv_slots=1024),
    VAttentionConfig(device="cpu", max_model_len=128, num_kv_slots=1024, page_size_kb=16, premap=False),  # 64 tokens a page
    VAttentionConfig(device="cpu", max_model_len=128, max_num_batched_tokens=16, max_num_seqs=8, num_kv_slots=512),
    VAttentionConfig(device="cpu", max_model_len=128, num_scheduler_steps=5, num_kv_slots=600, deferred_reclamation=False,
                     overlap_mapping=False),
], ids=lambda c: f"{c.name}-{getattr(c, 'block_size', getattr(c, 'reservation', getattr(c, 'page_size_kb', '')))}"
                    f"-{c.max_num_batched_tokens}-k{c.num_scheduler_steps}")
def test_greedy_matches_reference(model_dir, reference, cfg):
    run_exact(model_dir, reference, cfg)


def test_prefix_caching_hits_and_stays_exact(model_dir, reference):
    stats = run_exact(model_dir, reference, PagedConfig(block_size=8, max_num_seqs=4), workload="shared")
    # 40 shared tokens = 5 full blocks; every request but the first finds them
    assert stats.prefix_cache_hits >= (N - 4) * 40
    off = run_exact(model_dir, reference, PagedConfig(block_size=8, max_num_seqs=4, enable_prefix_caching=False),
                    workload="shared")
    assert off.prefix_cache_hits == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("chunk", [None, 16], ids=["whole-prompts", "chunked-16"])  # 16: prompts preempted part-way
def test_preemption_stays_exact(model_dir, reference, mode, chunk):
    budget = {"max_num_batched_tokens": chunk, "max_num_seqs": 8} if chunk else {}
    stats = run_exact(model_dir, reference, PagedConfig(block_size=4, num_blocks=40, preemption_mode=mode,
                                                        swap_space=0.001, num_scheduler_steps=3, **budget),
                      workload="shared")
    assert stats.num_preemptions > 0
    if mode == "swap":
        assert stats.num_swapped_out > 0


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole-prompts", "chunked-16"])
def test_vattention_preemption_and_reclamation_stay_exact(model_dir, reference, chunk):
    """Ten page groups (and the anchor) for 32 requests of up to 140 tokens: sequences are preempted, and pages freed by one are
    taken back from the slot they idle in (an unmap, then a map elsewhere)."""
    budget = {"max_num_batched_tokens": chunk, "max_num_seqs": 8} if chunk else {}
    engine = create_engine(model_dir, VAttentionConfig(device="cpu", max_model_len=160, num_kv_slots=176, num_scheduler_steps=3,
                                                       **budget))
    prompts, lengths, expected = reference["shared"]
    got = engine.generate(requests(prompts, lengths))
    assert [got[f"r{i}"][0] for i in range(N)] == expected
    assert engine.kv_stats().num_preemptions > 0
    assert engine.kv.num_unmaps > 0 and engine.kv.num_maps > engine.kv.num_groups


@pytest.mark.parametrize("name", ["hf", "hf_paged"])
def test_transformers_baselines_match_reference(model_dir, reference, name):
    prompts, lengths, expected = reference["mixed"]
    cfg = HFConfig(batch_size=4, dtype="float32") if name == "hf" else HFPagedConfig(
        dtype="float32", block_size=16, num_blocks=256, max_batch_tokens=256)
    engine = create_engine(model_dir, cfg)
    try:
        got = engine.generate(requests(prompts[:8], lengths[:8]))
    finally:
        engine.close()
    assert [got[f"r{i}"][0] for i in range(8)] == expected[:8]


@pytest.mark.parametrize("cfg", [PagedConfig(block_size=4), ContiguousConfig(reservation="oracle", num_scheduler_steps=4),
                                 VAttentionConfig(device="cpu", max_model_len=128, num_kv_slots=1024)],
                         ids=["paged", "contiguous", "vattention"])
def test_parallel_samples(model_dir, reference, cfg):
    prompts, lengths, expected = reference["mixed"]
    engine = create_engine(model_dir, cfg)
    greedy = engine.generate([Request("g", prompts[0], SamplingParams(n=3, max_tokens=lengths[0], temperature=0,
                                                                      ignore_eos=True))])
    assert greedy["g"] == [expected[0]] * 3
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    first = engine.generate([Request("s", prompts[1], params)])["s"]
    again = engine.generate([Request("s", prompts[1], params)])["s"]
    assert first == again and len({tuple(s) for s in first}) == 4
    assert engine.kv_stats().allocated == 0


def test_paged_and_contiguous_sample_alike(model_dir, reference):
    prompts, _, _ = reference["mixed"]
    reqs = lambda: [Request(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=i,
                                                      ignore_eos=True, n=2)) for i, p in enumerate(prompts[:6])]
    a = create_engine(model_dir, PagedConfig(block_size=16)).generate(reqs())
    b = create_engine(model_dir, ContiguousConfig(reservation="pow2")).generate(reqs())
    c = create_engine(model_dir, PagedConfig(block_size=16, num_scheduler_steps=4)).generate(reqs())
    assert a == b == c


def test_abort_frees_memory_at_once(model_dir, reference):
    prompts, _, _ = reference["mixed"]
    engine = create_engine(model_dir, PagedConfig(block_size=4, max_num_seqs=4))
    for i, p in enumerate(prompts[:6]):
        engine.add_request(Request(f"r{i}", p, SamplingParams(max_tokens=30, ignore_eos=True, n=2 if i == 0 else 1)))
    for _ in range(3):
        engine.step()
    assert engine.kv_stats().allocated > 0
    for i in range(6):
        engine.abort(f"r{i}")
    assert engine.kv_stats().allocated == 0 and not engine.has_unfinished()
    outs = engine.step()
    assert sorted((o.request_id, o.index) for o in outs) == sorted([("r0", 0), ("r0", 1)] + [(f"r{i}", 0) for i in range(1, 6)])
    assert all(o.finish_reason is FinishReason.ABORT and o.finished for o in outs)


def test_bad_requests_are_refused(model_dir):
    engine = create_engine(model_dir, PagedConfig(block_size=4, num_blocks=8, max_model_len=64))
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request(Request("a", [], SamplingParams()))
    with pytest.raises(RequestError, match="leaves no room"):
        engine.add_request(Request("b", list(range(64)), SamplingParams()))
    with pytest.raises(RequestError, match="can never fit in KV memory"):
        engine.add_request(Request("c", list(range(10)), SamplingParams(max_tokens=40)))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request(Request("d", [5, 10**6], SamplingParams()))
    assert not engine.has_unfinished()


def test_unknown_engine_and_config_errors(model_dir):
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        create_engine(model_dir, PagedConfig(block_size=12))
    with pytest.raises(ValueError, match="unknown reservation policy 'half'"):
        create_engine(model_dir, ContiguousConfig(reservation="half"))
    with pytest.raises(ValueError, match="cannot swap"):
        create_engine(model_dir, ContiguousConfig(preemption_mode="swap"))
    with pytest.raises(ValueError, match=r"cuda_graph_max_tokens must be >= 0 \(0: no piecewise graphs\), got -1"):
        create_engine(model_dir, PagedConfig(cuda_graph_max_tokens=-1))
    with pytest.raises(ValueError, match="cuda_graph_token_step must be >= 1, got 0"):
        create_engine(model_dir, ContiguousConfig(cuda_graph_token_step=0))
    assert issubclass(EngineNotAvailable, RuntimeError)


@pytest.mark.parametrize("steps", [1, 6])
def test_stop_strings_and_streamed_text(model_dir, steps):
    engine = create_engine(model_dir, PagedConfig(block_size=4, num_scheduler_steps=steps))
    prompt = engine.tokenizer.encode("The capital of France").ids
    full = engine.generate([Request("x", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))])["x"][0]
    text = engine.tokenizer.decode(full)
    stop = text[5:9]
    engine.add_request(Request("y", prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop], ignore_eos=True)))
    pieces, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.text)
            last = out
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == stop
    assert "".join(pieces) == text[: text.index(stop)]


def test_hf_paged_samples_per_request(model_dir, reference):
    prompts, lengths, expected = reference["mixed"]
    engine = create_engine(model_dir, HFPagedConfig(dtype="float32", block_size=16, num_blocks=256, max_batch_tokens=256,
                                                    do_sample=True))
    try:
        got = engine.generate([
            Request("greedy", prompts[0], SamplingParams(max_tokens=lengths[0], temperature=0, ignore_eos=True)),
            Request("hot", prompts[0], SamplingParams(max_tokens=20, temperature=1.5, top_p=0.95, top_k=50,
                                                      ignore_eos=True, n=2)),
        ])
    finally:
        engine.close()
    assert got["greedy"] == [expected[0]]
    assert all(len(s) == 20 for s in got["hot"]) and got["hot"][0] != got["hot"][1]
