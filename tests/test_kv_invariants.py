"""Randomized interleavings of add / step / abort on real engines keep the KV managers' invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines import create_engine
from engines.config import ContiguousConfig, PagedConfig, VAttentionConfig
from engines.request import FinishReason, Request, SamplingParams
from engines.sequence import Sequence


def check_sharing(engine) -> None:
    """A block in two tables holds the same tokens for both (a shared prefix, or a fork before its CoW)."""
    kv, bs = engine.kv, engine.kv.block_size
    seqs = {s.seq_id: s for s in engine.scheduler.live}
    holders: dict[int, list[tuple[Sequence, int]]] = {}
    for seq_id, table in kv.tables.items():
        for i, block in enumerate(table):
            holders.setdefault(block.block_id, []).append((seqs[seq_id], i))
    for block_id, held in holders.items():
        if len(held) < 2:
            continue
        contents = {tuple(s.token_ids[i * bs : min((i + 1) * bs, s.num_computed)]) for s, i in held}
        prefixes = sorted(contents, key=len)
        assert all(longer[: len(prefixes[0])] == prefixes[0] for longer in prefixes), f"block {block_id} diverged"


def check_mapped(engine) -> None:
    """The storage maps exactly the pages the manager says are mapped, each with the group it says, once the
    manager's ops not yet applied (the next step's) are."""
    kv, storage = engine.kv, engine.runner.storage
    storage.join()
    mapped = dict(storage.mapped)
    for key in kv.ops.unmaps:
        del mapped[key]
    mapped |= {(slot, page): group for slot, page, group in kv.ops.maps}
    expected = {(int(r), int(p)): int(kv.page_of[r, p]) for r, p in zip(*(kv.page_of >= 0).nonzero())}
    assert mapped == expected, "storage out of step with the page table"


operation = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 24), st.integers(1, 3), st.integers(0, 2)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
)

CONFIGS = {
    "paged-recompute": PagedConfig(block_size=4, num_blocks=24, max_num_seqs=6, max_num_batched_tokens=24),
    "paged-swap": PagedConfig(block_size=2, num_blocks=40, max_num_seqs=6, max_num_batched_tokens=16,
                              preemption_mode="swap", swap_space=0.0002),
    "paged-big-blocks": PagedConfig(block_size=16, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=32),
    "paged-multistep": PagedConfig(block_size=4, num_blocks=30, max_num_seqs=6, max_num_batched_tokens=24,
                                   num_scheduler_steps=4),
    "contiguous-pow2": ContiguousConfig(reservation="pow2", num_kv_slots=160, max_num_seqs=6, max_num_batched_tokens=24),
    "contiguous-max": ContiguousConfig(reservation="max", max_model_len=64, num_kv_slots=200, max_num_seqs=6,
                                       max_num_batched_tokens=24),
    # tiny-qwen3 in float32: 16 tokens a 4 KiB page
    "vattention": VAttentionConfig(device="cpu", max_model_len=64, num_kv_slots=160, max_num_seqs=6, max_num_batched_tokens=24),
    "vattention-first-touch": VAttentionConfig(device="cpu", max_model_len=64, num_kv_slots=128, max_num_seqs=6,
                                               max_num_batched_tokens=24, premap=False),
    "vattention-eager-unmap": VAttentionConfig(device="cpu", max_model_len=64, num_kv_slots=96, max_num_seqs=4,
                                               max_num_batched_tokens=16, deferred_reclamation=False,
                                               overlap_mapping=False, num_scheduler_steps=3),
}


@pytest.fixture(scope="module")
def engines(tiny_model):
    path = tiny_model("tiny-qwen3")
    return {name: create_engine(path, cfg) for name, cfg in CONFIGS.items()}


def must_accept(engine, prompt_len: int, max_tokens: int, n: int) -> bool:
    """Whether the engine must take the request: it refuses only what can never fit (docs/methodology.md)."""
    cfg, context = engine.cfg, engine.max_model_len
    if prompt_len >= context or n > cfg.max_num_seqs:
        return False
    longest = min(prompt_len + max_tokens, context)
    if isinstance(cfg, PagedConfig):
        return -(-longest // cfg.block_size) <= cfg.num_blocks
    if isinstance(cfg, VAttentionConfig):
        return -(-longest // engine.kv.tokens_per_page) * n <= engine.kv.num_groups
    size = {"max": context, "pow2": min(1 << (longest - 1).bit_length(), context), "oracle": longest}[cfg.reservation]
    return size * n <= cfg.num_kv_slots


@pytest.mark.parametrize("name", list(CONFIGS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=25), prefix=st.lists(st.integers(0, 999), min_size=8, max_size=8))
def test_invariants_hold_after_every_step(engines, name, ops, prefix):
    engine = engines[name]
    added = 0
    accepted: dict[str, tuple[int, int, int]] = {}  # request id -> (n, expected tokens per sample, prompt length)
    aborted: set[str] = set()
    finals: dict[tuple[str, int], list] = {}

    def step() -> None:
        for out in engine.step():
            finals.setdefault((out.request_id, out.index), []).append(out)

    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, n, temperature = op
            prompt = (prefix + [(added * 7 + j) % 1000 for j in range(prompt_len)])[:prompt_len + 4]
            rid = f"q{added}"
            try:
                engine.add_request(Request(rid, prompt, SamplingParams(
                    max_tokens=max_tokens, n=n, temperature=temperature / 2, seed=added, ignore_eos=True)))
                accepted[rid] = (n, min(max_tokens, engine.max_model_len - len(prompt)), len(prompt))
            except ValueError:
                # too large for this cache: refused at the door, nothing held; but only then
                assert not must_accept(engine, len(prompt), max_tokens, n), f"{name} refused a request that fits"
            added += 1
        elif op[0] == "abort":
            engine.abort(f"q{op[1]}")
            aborted.add(f"q{op[1]}")
        else:
            for _ in range(op[1]):
                step()
        live = engine.scheduler.live
        engine.kv.check_invariants(live)
        if hasattr(engine.kv, "tables"):
            check_sharing(engine)
        if hasattr(engine.kv, "page_of"):
            check_mapped(engine)
    while engine.has_unfinished():  # drain: everything finishes and frees its memory
        step()
        engine.kv.check_invariants(engine.scheduler.live)
    step()  # collect abort outputs
    stats = engine.kv_stats()
    assert stats.allocated == 0 and stats.free == stats.capacity and stats.largest_free_extent == stats.capacity
    # every request taken ran to its end: each sample finished once, with all its tokens unless it was aborted
    for rid, (n, expected, _) in accepted.items():
        for i in range(n):
            outs = finals.get((rid, i), [])
            assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished, (rid, i)
            tokens = sum(len(o.new_token_ids) for o in outs)
            if outs[-1].finish_reason is FinishReason.LENGTH:
                assert tokens == expected, (rid, i, tokens, expected)
            else:
                assert outs[-1].finish_reason is FinishReason.ABORT and rid in aborted, (rid, i, outs[-1].finish_reason)
    completed = {rid for rid in accepted if finals[(rid, 0)][-1].finish_reason is FinishReason.LENGTH}
    assert completed >= set(accepted) - aborted
