"""The transformers baselines: they stop where our stop rules say, and stamp tokens when they exist.

transformers fills an unset ``eos_token_id`` back from the model directory, so ``generate``
would end a row at that token on its own: a short output never marked finished at batch
size 1, pad tokens counted as output in a padded batch. These tests use a model directory
whose EOS token is one that greedy decoding really emits early.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from engines import create_engine
from engines.base import Engine
from engines.config import HFConfig, HFPagedConfig, PagedConfig
from engines.detokenizer import SampleStream, load_tokenizer
from engines.hf import _Batch, _StreamRows
from engines.hf_common import Row as _Row
from engines.hf_paged import cb_attn_implementation
from engines.request import FinishReason, Request, SamplingParams

MAX_TOKENS = [12, 8, 12, 10]  # per request: exact lengths differ within one padded batch


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(1000) for _ in range(n)] for n in (7, 19, 3, 26)]  # padded to different widths


def _requests(ignore_eos: bool) -> list[Request]:
    return [Request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=ignore_eos))
            for i, (p, n) in enumerate(zip(_prompts(), MAX_TOKENS))]


def _run(engine: Engine, requests: list[Request]) -> dict[str, tuple[list[int], FinishReason | None]]:
    """Request id -> (its tokens, its finish reason or None if it was never marked finished)."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, FinishReason | None] = dict.fromkeys(tokens)
    for r in requests:
        engine.add_request(r)
    deadline = time.monotonic() + 120
    try:
        while engine.has_unfinished():
            assert time.monotonic() < deadline, "the engine never finished"
            for out in engine.step():
                assert out.error is None, out.error
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
    finally:
        engine.close()
    return {k: (tokens[k], reasons[k]) for k in tokens}


def _choose_eos(outputs: list[list[int]], avoid: set[int]) -> int:
    """A token that one request's greedy output first emits at position 1..4 and another never emits."""
    for i, out in enumerate(outputs):
        for j in range(1, 5):
            token = out[j]
            if token in out[:j] or token in avoid:
                continue
            if any(token not in other for k, other in enumerate(outputs) if k != i):
                return token
    raise AssertionError(f"no usable EOS token in the greedy outputs {outputs}")


@dataclass
class EOSModel:
    path: Path
    eos: int
    ours: dict[str, list[int]]  # our paged engine's greedy tokens per request, EOS ignored


@pytest.fixture(scope="module")
def eos_model(tiny_model, tmp_path_factory) -> EOSModel:
    """A copy of the tiny model whose config.json and generation_config.json name a token greedy decoding hits."""
    src = tiny_model("tiny-qwen3")
    greedy = _run(create_engine(src, PagedConfig(block_size=16)), _requests(ignore_eos=True))
    config = json.loads((src / "config.json").read_text())
    eos = _choose_eos([greedy[f"r{i}"][0] for i in range(len(MAX_TOKENS))], {config["pad_token_id"], config["eos_token_id"]})
    out = tmp_path_factory.mktemp("eos-model") / "tiny-qwen3-eos"
    shutil.copytree(src, out)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((out / name).read_text())
        data["eos_token_id"] = eos
        (out / name).write_text(json.dumps(data, indent=2))
    ours = _run(create_engine(out, PagedConfig(block_size=16)), _requests(ignore_eos=True))
    return EOSModel(out, eos, {k: tokens for k, (tokens, _) in ours.items()})


BASELINES = [HFConfig(batch_size=1, dtype="float32"), HFConfig(batch_size=4, dtype="float32"),
             HFPagedConfig(dtype="float32", block_size=16, num_blocks=64, max_batch_tokens=256)]


@pytest.mark.parametrize("cfg", BASELINES, ids=["hf-batch1", "hf-batch4", "hf_paged"])
def test_ignore_eos_gives_exact_lengths_and_our_tokens(eos_model, cfg):
    assert any(eos_model.eos in tokens for tokens in eos_model.ours.values()), "the test model must emit its EOS token"
    got = _run(create_engine(eos_model.path, cfg), _requests(ignore_eos=True))
    for i, n in enumerate(MAX_TOKENS):
        tokens, reason = got[f"r{i}"]
        assert len(tokens) == n and reason is FinishReason.LENGTH, (i, tokens, reason)
        assert tokens == eos_model.ours[f"r{i}"], i


@pytest.mark.parametrize("cfg", BASELINES, ids=["hf-batch1", "hf-batch4", "hf_paged"])
def test_without_ignore_eos_a_request_stops_at_eos(eos_model, cfg):
    eos = eos_model.eos
    got = _run(create_engine(eos_model.path, cfg), _requests(ignore_eos=False))
    stopped = 0
    for i in range(len(MAX_TOKENS)):
        expected = eos_model.ours[f"r{i}"]
        if eos in expected:
            expected, reason = expected[: expected.index(eos) + 1], FinishReason.STOP
            stopped += 1
        else:
            reason = FinishReason.LENGTH
        assert got[f"r{i}"] == (expected, reason), i
    assert 0 < stopped < len(MAX_TOKENS)  # rows of one batch end at different steps


class _DeviceIds:
    """Stands in for generate's token tensor on a GPU: reading its tokens is where the host waits."""

    shape = (1, 9)
    device = "cpu"

    def __getitem__(self, key: object) -> "_DeviceIds":
        return self

    def tolist(self) -> list[int]:
        time.sleep(0.01)  # the device finishing the step
        self.ready = time.perf_counter()
        return [42]


def test_tokens_are_stamped_after_the_device_sync(tiny_model):
    model_dir = tiny_model("tiny-qwen3")
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    stream = SampleStream(load_tokenizer(model_dir), request.sampling_params, 3, (), 64)
    batch = _Batch([_Row(request, 0, stream)])
    ids = _DeviceIds()
    _StreamRows(batch, 3, time.perf_counter())(ids, None)
    [out] = batch.events.get_nowait()
    assert out.new_token_ids == [42] and out.token_times[0] >= ids.ready


@pytest.mark.parametrize("attn", ["paged|sdpa", "sdpa"])
def test_hf_paged_takes_either_transformers_spelling_without_deprecations(tiny_model, caplog, attn):
    """5.17 spells it ``paged|sdpa`` and ``block_size``; later versions ``sdpa`` and ``page_size``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model_dir = tiny_model("tiny-qwen3")
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = create_engine(model_dir, HFPagedConfig(attn_implementation=attn, block_size=16, num_blocks=64,
                                                        max_batch_tokens=256))
        try:
            got = engine.generate([Request("r", list(range(1, 40)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))])
            stats = engine.kv_stats()
        finally:
            engine.close()
    name = cb_attn_implementation("paged|sdpa")
    assert name == cb_attn_implementation("sdpa") and name in ALL_ATTENTION_FUNCTIONS and name.endswith("sdpa")
    assert engine.attn_implementation == name and len(got["r"][0]) == 6
    assert stats.capacity == 64 * 16  # block_size reached transformers under either name
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
                    and "transformers" in w.filename]
    deprecations += [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage() or "no longer" in r.getMessage()]
    assert not deprecations
