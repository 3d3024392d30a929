"""The batched sampler: each parameter changes the outcome the way its definition says."""

from __future__ import annotations

import pytest
import torch

from engines.request import RequestError, SamplingParams
from engines.sampling import Sampler, SamplingBatch

V = 50


def sample(logits: torch.Tensor, params: list[SamplingParams], outputs=None, prompts=None, seeds=None) -> torch.Tensor:
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in (seeds or [None] * len(params))]
    batch = SamplingBatch.build(params, gens, outputs or [[] for _ in params], prompts or [[] for _ in params], V,
                                torch.device("cpu"))
    return Sampler()(logits.clone(), batch)


def draws(logits_row: torch.Tensor, p: SamplingParams, n: int = 4000, **kw) -> torch.Tensor:
    """Sample one distribution n times in one batch."""
    return sample(logits_row.expand(n, V), [p] * n, **kw)


@pytest.fixture()
def logits() -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2


def test_greedy_is_argmax(logits):
    out = sample(torch.stack([logits, -logits]), [SamplingParams(temperature=0)] * 2)
    assert out.tolist() == [int(logits.argmax()), int((-logits).argmax())]


def test_seeded_rows_reproduce_whatever_the_batch(logits):
    p = SamplingParams(temperature=1.0)
    a = sample(logits.expand(3, V), [p] * 3, seeds=[7, None, 8])
    b = sample(torch.stack([torch.randn(V), logits, logits]), [p] * 3, seeds=[None, 7, 8])
    assert a[0] == b[1] and a[2] == b[2]
    runs = {tuple(sample(logits.expand(6, V), [p] * 6, seeds=list(range(6))).tolist()) for _ in range(3)}
    assert len(runs) == 1


def test_temperature_sharpens_and_flattens(logits):
    cold = draws(logits, SamplingParams(temperature=0.2))
    hot = draws(logits, SamplingParams(temperature=5.0))
    top = int(logits.argmax())
    assert (cold == top).float().mean() > (hot == top).float().mean() + 0.2
    assert len(set(hot.tolist())) > len(set(cold.tolist()))


def test_top_k_keeps_only_k_tokens(logits):
    out = draws(logits, SamplingParams(temperature=1.0, top_k=3))
    assert set(out.tolist()) <= set(logits.topk(3).indices.tolist())
    assert len(set(out.tolist())) == 3


def test_top_p_keeps_the_smallest_nucleus(logits):
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    k = int((cum < 0.5).sum()) + 1  # tokens needed to reach 0.5
    out = draws(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert set(out.tolist()) == set(order[:k].tolist())


def test_min_p_drops_unlikely_tokens(logits):
    probs = logits.softmax(-1)
    keep = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    out = draws(logits, SamplingParams(temperature=1.0, min_p=0.2))
    assert set(out.tolist()) == keep


def test_penalties_change_greedy_choice():
    logits = torch.zeros(V)
    logits[3], logits[4] = 2.0, 1.5
    greedy = SamplingParams(temperature=0)
    assert sample(logits[None], [greedy], outputs=[[3]]).item() == 3
    for p in (SamplingParams(temperature=0, presence_penalty=1.0),
              SamplingParams(temperature=0, frequency_penalty=0.3),
              SamplingParams(temperature=0, repetition_penalty=1.5)):
        assert sample(logits[None], [p], outputs=[[3, 3]]).item() == 4, p
    # frequency scales with the count, presence does not
    assert sample(logits[None], [SamplingParams(temperature=0, frequency_penalty=0.3)], outputs=[[3]]).item() == 3
    # repetition penalty also covers prompt tokens
    assert sample(logits[None], [SamplingParams(temperature=0, repetition_penalty=1.5)], prompts=[[3]]).item() == 4


def test_mixed_batch_rows_follow_their_own_params(logits):
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0)]
    out = sample(logits.expand(3, V), params, seeds=[None, None, 3])
    assert out[0] == out[1] == int(logits.argmax())


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"min_p": 2}, "min_p"),
    ({"n": 0}, "n"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"top_k": 2**63}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs)
