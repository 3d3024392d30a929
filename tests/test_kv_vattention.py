"""The virtual-contiguous KV manager and its storage, by hand-worked cases; the engine's start-up errors."""

from __future__ import annotations

import itertools
import sys

import pytest

import kv_sim

from engines import create_engine
from engines.config import VAttentionConfig
from engines.kv.manager import CacheOps
from engines.kv.storage import HostPageStorage, KVStorage, PageGeometry
from engines.kv.virtual_manager import VirtualKVManager
from engines.detokenizer import SampleStream
from engines.request import Request, SamplingParams
from engines.sequence import Sequence

_ids = itertools.count()


def seq(prompt_len: int, max_tokens: int = 8, n: int = 1) -> Sequence:
    return kv_sim.seq(f"q{next(_ids)}", prompt_len, max_tokens, n=n, max_model_len=100)


def manager(groups: int = 6, page: int = 4, slots: int = 3, deferred: bool = True, premap: bool = False
            ) -> VirtualKVManager:
    return VirtualKVManager(groups, page, num_request_slots=slots, max_model_len=10, deferred_reclamation=deferred,
                            premap=premap)


def run(kv: VirtualKVManager, s: Sequence, tokens: int) -> None:
    """Allocate and compute ``tokens`` more tokens of ``s``."""
    assert kv.allocate(s, tokens)
    s.num_computed += tokens
    kv.ledger.computed(tokens)


def test_a_slot_spans_max_model_len_in_whole_pages_and_addresses_contiguously():
    kv = manager()
    assert (kv.pages_per_slot, kv.slot_tokens, kv.capacity) == (3, 12, 24)
    a, b = seq(5), seq(2)
    kv.admit(a), kv.admit(b)
    run(kv, a, 5)
    run(kv, b, 2)
    # a in slot 0 (pages 0-1), b in slot 1: slots are 12 tokens apart, after the 4-token anchor page
    assert kv.slot_mapping(a, 3, 5).tolist() == [7, 8]
    assert kv.slot_mapping(b, 0, 2).tolist() == [16, 17]
    assert kv.addressing([b, a])[1].tolist() == [16, 4]
    assert kv.ops.maps == [(0, 0, 0), (0, 1, 1), (1, 0, 2)]
    assert kv.ledger.held(a) == 8 and kv.ledger.held(b) == 4
    stats = kv.kv_stats(None)
    assert (stats.allocated, stats.free, stats.stored) == (12, 12, 7)
    kv.check_invariants([a, b])


def test_a_page_is_mapped_when_a_sequence_crosses_into_it():
    kv = manager()
    a = seq(3)
    kv.admit(a)
    run(kv, a, 3)
    kv.take_ops()
    run(kv, a, 1)  # token 4 fills page 0
    assert not kv.take_ops()
    run(kv, a, 1)  # token 5 needs page 1
    assert kv.take_ops().maps == [(0, 1, 1)]
    kv.check_invariants([a])


def test_deferred_reclamation_reuses_a_freed_slot_without_a_driver_call():
    kv = manager()
    a = seq(7)
    kv.admit(a)
    run(kv, a, 7)
    kv.free(a)
    assert not kv.take_ops().unmaps and kv.kv_stats(None).free == kv.capacity  # idle pages are free memory
    b = seq(6)
    kv.admit(b)
    run(kv, b, 6)
    ops = kv.take_ops()
    assert kv.slot_of[b.seq_id] == 0 and not ops.maps and not ops.unmaps  # a's two pages, still mapped
    kv.check_invariants([b])


def test_idle_pages_are_taken_back_only_when_no_unmapped_group_is_left():
    kv = manager(groups=3)
    a, b = seq(8), seq(4)
    kv.admit(a)
    run(kv, a, 8)  # groups 0, 1 at slot 0
    kv.free(a)
    kv.admit(b)
    kv.take_ops()
    run(kv, b, 4)  # reuses slot 0's page 0
    c = seq(8)
    kv.admit(c)
    assert kv.allocate(c, 8)  # slot 1: group 2 (unmapped), then slot 0's idle page 1
    ops = kv.take_ops()
    assert ops.unmaps == [(0, 1)] and ops.maps == [(1, 0, 2), (1, 1, 1)]
    d = seq(1)
    kv.admit(d)
    assert not kv.allocate(d, 1)  # nothing free: refused, nothing taken
    assert not kv.take_ops()
    c.num_computed = 8
    kv.ledger.computed(8)
    kv.check_invariants([b, c])


def test_premapping_spreads_the_pool_over_the_slots_page_by_page_and_admissions_then_map_nothing():
    kv = manager(groups=5, slots=3, premap=True)
    assert kv.take_ops().maps == [(0, 0, 0), (1, 0, 1), (2, 0, 2), (0, 1, 3), (1, 1, 4)]
    assert kv.kv_stats(None).free == kv.capacity  # idle: free memory
    a, b = seq(8), seq(3)
    kv.admit(a), kv.admit(b)
    run(kv, a, 8)  # slot 0 (two idle pages): no map
    run(kv, b, 3)
    assert not kv.take_ops()
    c = seq(8)
    kv.admit(c)
    run(kv, c, 8)  # slot 2: its idle page 0, then slot 1's idle page 1 taken back
    assert kv.take_ops() == CacheOps(unmaps=[(1, 1)], maps=[(2, 1, 4)])
    kv.check_invariants([a, b, c])
    assert manager(premap=True, deferred=False).take_ops().maps == []  # nothing idle without deferred reclamation


def test_without_deferred_reclamation_a_free_unmaps_at_once():
    kv = manager(deferred=False)
    a = seq(5)
    kv.admit(a)
    run(kv, a, 5)
    kv.take_ops()
    kv.free(a)
    assert kv.take_ops().unmaps == [(0, 0), (0, 1)]
    assert kv.kv_stats(None).free == kv.capacity
    kv.check_invariants([])


def test_samples_get_their_slots_and_prompt_pages_at_admission_and_copy_the_prompt_at_fork():
    kv = manager(groups=6, slots=3)
    parent = seq(5, n=2)
    kv.admit(parent)
    run(kv, parent, 5)
    assert kv.ledger.held(parent) == 16  # its 2 pages and its sample's 2
    assert len(kv.free_slots) == 1
    child = Sequence(parent.request, 1, SampleStream(None, parent.request.sampling_params, 5, (), 100), None)
    child.num_computed = parent.num_computed
    kv.take_ops()
    kv.fork(parent, child)
    assert kv.ledger.held(parent) == 8 and kv.ledger.held(child) == 8
    start = 4 + kv.slot_of[child.seq_id] * kv.slot_tokens
    assert kv.take_ops().copies == [(4 + i, start + i) for i in range(5)]
    kv.check_invariants([parent, child])


def test_a_request_fits_only_within_its_slot_and_the_pool():
    kv = manager(groups=2)
    assert kv.can_ever_fit(seq(4, max_tokens=4))  # 8 tokens: 2 pages
    assert not kv.can_ever_fit(seq(4, max_tokens=5))  # 3 pages, 2 in the pool
    assert not kv.can_ever_fit(seq(4, max_tokens=2, n=2))  # 2 pages for each of 2 samples
    assert manager(groups=6).can_ever_fit(seq(4, max_tokens=2, n=2))
    assert not manager(groups=6).can_ever_fit(seq(4, max_tokens=9))  # 13 tokens: past its 12-token slot


def test_host_storage_refuses_what_the_driver_would():
    geometry = PageGeometry(num_layers=1, num_request_slots=2, slot_tokens=8, tokens_per_page=4, token_bytes=16)
    # planes of 4 anchor tokens + 2 slots x 8 tokens, 16 bytes a token
    assert geometry.plane_tokens == 20 and geometry.anchor_offsets() == [0, 320]
    assert geometry.offsets(1, 1) == [(4 + 8 + 4) * 16, 320 + (4 + 8 + 4) * 16]

    def mapped() -> HostPageStorage:
        storage = HostPageStorage(None, geometry)
        storage.apply([], [(0, 0, 0), (1, 1, 1)])
        return storage

    for bad, message in [(([], [(0, 0, 2)]), "mapped twice"), (([(1, 0)], []), "unmapped twice"),
                         (([], [(1, 0, 0)]), "two pages at once")]:
        with pytest.raises(RuntimeError, match=message):
            mapped().apply(*bad)
    storage = mapped()
    storage.apply_async([(0, 0)], [(0, 1, 0)])  # group 0 moves; a worker's error would surface at join
    storage.join()
    assert storage.mapped == {(1, 1): 1, (0, 1): 0}
    storage.apply_async([], [(0, 1, 2)])
    with pytest.raises(RuntimeError, match="mapped twice"):
        storage.join()


def test_an_ordinary_allocation_has_no_pages():
    with pytest.raises(RuntimeError, match="no pages to map"):
        KVStorage(None).apply([], [(0, 0, 0)])


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("tiny-qwen3")


@pytest.mark.parametrize("cfg, message", [
    (VAttentionConfig(device="cpu", max_model_len=64, page_size_kb=6), "multiple of the host's page size"),
    (VAttentionConfig(device="cpu", max_model_len=256, num_kv_slots=200), "too few for one request of max_model_len"),
])
def test_bad_setups_are_refused_at_start_up(model_dir, cfg, message):
    with pytest.raises(ValueError, match=message):
        create_engine(model_dir, cfg)


def test_missing_driver_bindings_are_named(monkeypatch):
    from engines.kv import cuda_vmm

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(cuda_vmm.VMMUnavailable, match="pip install 'cuda-bindings"):
        cuda_vmm._driver()


def test_requests_run_to_their_end_and_give_every_page_back(model_dir):
    engine = create_engine(model_dir, VAttentionConfig(device="cpu", max_model_len=96, num_kv_slots=256, max_num_seqs=4))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    got = engine.generate([Request(f"r{i}", list(range(3, 40 + i)), params) for i in range(6)])
    assert all(len(got[f"r{i}"][0]) == 30 for i in range(6))
    stats = engine.kv_stats()
    assert stats.allocated == 0 and stats.free == stats.capacity
    assert engine.runner.storage.num_map_calls > 0 and engine.runner.storage.map_seconds > 0
    engine.kv.check_invariants([])
