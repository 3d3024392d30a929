"""Logprobs over HTTP, in OpenAI's two shapes, against transformers' log_softmax of the same model in float32:
completions (``logprobs``, ``echo``, ``max_tokens: 0`` to score a prompt, streamed or not) and chat
(``logprobs`` with ``top_logprobs``), and through the official ``openai`` client."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from engines.config import PagedConfig

TOL = 1e-4
PROMPT = [(11 * j) % 700 + 5 for j in range(30)]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(PagedConfig(num_kv_slots=4096, max_model_len=256, dtype="float32"))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def log_softmax(server):
    """log_softmax at every position of a token sequence [len - 1, V]: row p scores token p + 1."""
    hf = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return run


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def completion(http, **body) -> dict:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, "ignore_eos": True,
                                           "return_tokens_as_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_logprobs_equal_transformers(http, log_softmax):
    out = completion(http, max_tokens=6, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    generated = ids_of(lp["tokens"])
    assert len(generated) == out["usage"]["completion_tokens"] == 6
    expected = log_softmax(PROMPT + generated)[len(PROMPT) - 1 :]
    for pos, token in enumerate(generated):
        assert abs(lp["token_logprobs"][pos] - expected[pos, token].item()) < TOL
        top = {int(k.removeprefix("token_id:")): v for k, v in lp["top_logprobs"][pos].items()}
        best = expected[pos].topk(3)
        assert set(best.indices.tolist()) | {token} == set(top)
        assert all(abs(top[i] - v) < TOL for i, v in zip(best.indices.tolist(), best.values.tolist()))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]


def test_echo_with_no_new_tokens_scores_the_prompt(http, log_softmax):
    """What evaluation harnesses send to score a text: echo, max_tokens 0, logprobs."""
    out = completion(http, max_tokens=0, echo=True, logprobs=1)
    choice, expected = out["choices"][0], log_softmax(PROMPT)
    lp = choice["logprobs"]
    assert ids_of(lp["tokens"]) == PROMPT and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(PROMPT)):
        assert abs(lp["token_logprobs"][pos] - expected[pos - 1, PROMPT[pos]].item()) < TOL
    assert out["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"


def test_echo_then_generated_and_streamed_equals_whole(http, log_softmax):
    whole = completion(http, max_tokens=5, echo=True, logprobs=2)["choices"][0]["logprobs"]
    assert len(whole["tokens"]) == len(PROMPT) + 5
    generated = ids_of(whole["tokens"])[len(PROMPT):]
    expected = log_softmax(PROMPT + generated)
    for pos in range(1, len(PROMPT) + 5):
        assert abs(whole["token_logprobs"][pos] - expected[pos - 1, (PROMPT + generated)[pos]].item()) < TOL
    streamed = {k: [] for k in whole}
    with http.stream("POST", "/v1/completions", json={
            "prompt": PROMPT, "temperature": 0, "ignore_eos": True, "return_tokens_as_token_ids": True,
            "max_tokens": 5, "echo": True, "logprobs": 2, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for key, values in (json.loads(line[6:])["choices"][0]["logprobs"] or {}).items():
                    streamed[key] += values
    assert streamed["tokens"] == whole["tokens"] and streamed["text_offset"] == whole["text_offset"]
    assert all(a == b or abs(a - b) < TOL for a, b in zip(streamed["token_logprobs"][1:], whole["token_logprobs"][1:]))


def test_chat_logprobs_with_top_logprobs(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello there"}],
                                                "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                                "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 4
    for item in content:
        assert item["logprob"] <= 0 and item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]
        assert item["logprob"] <= item["top_logprobs"][0]["logprob"] + TOL  # greedy: the chosen one is the best
    plain = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_the_openai_client_reads_them(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    chat = client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, logprobs=True, top_logprobs=3, temperature=0)
    assert len(chat.choices[0].logprobs.content) == 3 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
    done = client.completions.create(model="tiny-qwen3", prompt="The sky is", max_tokens=0, echo=True, logprobs=0)
    lp = done.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == done.usage.prompt_tokens
