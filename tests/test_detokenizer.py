"""Incremental detokenization and stop rules, on a real tokenizer of a tiny preset."""

from __future__ import annotations

import pytest

from engines.detokenizer import SampleStream, load_tokenizer
from engines.request import FinishReason, SamplingParams

TEXT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model("tiny-qwen3"))


def stream_for(tokenizer, eos=(), max_model_len=4096, **params) -> SampleStream:
    return SampleStream(tokenizer, SamplingParams(**{"max_tokens": 1000, **params}), prompt_len=5,
                        eos_token_ids=eos, max_model_len=max_model_len)


def feed(stream: SampleStream, ids: list[int]) -> list[str]:
    pieces = []
    for t in ids:
        pieces.append(stream.append(t))
        if stream.finished:
            break
    return pieces


def test_text_round_trips_incrementally(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    s = stream_for(tokenizer)
    assert "".join(feed(s, ids)) == TEXT
    assert not s.finished


@pytest.mark.parametrize("stop", ["of Fr", "x jum", "Paris."])
def test_stop_string_across_token_boundaries(tokenizer, stop):
    ids = tokenizer.encode(TEXT).ids
    # the stop string really spans several tokens
    pieces = [tokenizer.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces)
    s = stream_for(tokenizer, stop=[stop])
    shown = "".join(feed(s, ids))
    assert s.finish_reason is FinishReason.STOP and s.stop_reason == stop
    assert shown == TEXT[: TEXT.index(stop)]  # nothing shown that was later retracted
    s = stream_for(tokenizer, stop=[stop], include_stop_str_in_output=True)
    assert "".join(feed(s, ids)) == TEXT[: TEXT.index(stop) + len(stop)]


def test_stop_token_ids_eos_and_ignore_eos(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    s = stream_for(tokenizer, stop_token_ids=[ids[3]])
    feed(s, ids)
    assert s.token_ids == ids[:4] and s.stop_reason == ids[3]
    s = stream_for(tokenizer, eos=(ids[2],))
    feed(s, ids)
    assert len(s.token_ids) == 3 and s.finish_reason is FinishReason.STOP
    s = stream_for(tokenizer, eos=(ids[2],), ignore_eos=True)
    feed(s, ids)
    assert len(s.token_ids) == len(ids) and not s.finished


def test_length_limits(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    s = stream_for(tokenizer, max_tokens=4)
    feed(s, ids)
    assert len(s.token_ids) == 4 and s.finish_reason is FinishReason.LENGTH
    s = stream_for(tokenizer, max_model_len=8)  # prompt of 5 leaves room for 3
    feed(s, ids)
    assert len(s.token_ids) == 3 and s.finish_reason is FinishReason.LENGTH
