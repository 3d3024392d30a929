"""Every bad input gets OpenAI's error JSON with a fitting status, never a 500 and never a hung connection."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from engines.config import ContiguousConfig, PagedConfig
from harness.serve.config import ServerConfig

MAX_LEN = 256
OK = {"prompt": [5, 6, 7, 8], "max_tokens": 2}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(PagedConfig(num_kv_slots=8192, max_model_len=MAX_LEN),
                        ServerConfig(max_n=4, max_body_bytes=64 * 1024, max_prompts=4))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def check_error(r: httpx.Response, status: int, param: str | None = None, words: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert words.lower() in err["message"].lower(), err
    return err


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": list(range(5, 5 + MAX_LEN + 10)), "max_tokens": 2}, "prompt", "maximum context length"),
    ({"prompt": list(range(5, 5 + MAX_LEN - 5)), "max_tokens": 20}, "max_tokens", "maximum context length"),
    ({**OK, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({**OK, "max_tokens": -3}, "max_tokens", "max_tokens"),
    ({**OK, "max_tokens": "ten"}, "max_tokens", "integer"),
    ({**OK, "max_tokens": 2.5}, "max_tokens", "integer"),
    ({**OK, "temperature": -0.5}, "temperature", "temperature"),
    ({**OK, "temperature": "hot"}, "temperature", "number"),
    ({**OK, "top_p": 0}, "top_p", "top_p"),
    ({**OK, "top_k": -5}, "top_k", "top_k"),
    ({**OK, "min_p": 2}, "min_p", "min_p"),
    ({**OK, "presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    ({**OK, "frequency_penalty": -9}, "frequency_penalty", "frequency_penalty"),
    ({**OK, "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({**OK, "n": 100}, "n", "n must be"),
    ({**OK, "n": 0}, "n", "n must be"),
    ({**OK, "n": True}, "n", "integer"),
    ({**OK, "stream": "yes"}, "stream", "boolean"),
    ({**OK, "stop": 5}, "stop", "stop must be"),
    ({**OK, "stop": [""]}, "stop", "stop"),
    ({**OK, "seed": 2**70}, "seed", "seed"),
    ({**OK, "seed": "x"}, "seed", "integer"),
    ({**OK, "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20]"),
    ({**OK, "logprobs": -1}, "logprobs", "logprobs must be an integer in [0, 20]"),
    ({**OK, "echo": True, "logprobs": 21}, "logprobs", "logprobs must be an integer"),
    ({**OK, "best_of": 3}, "best_of", "best_of"),
    ({**OK, "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({**OK, "suffix": "x"}, "suffix", "not supported"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"max_tokens": 2}, "prompt", "required"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [[]]}, "prompt", "empty"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
    ({"prompt": {"text": "hi"}}, "prompt", "prompt must be"),
    ({"prompt": [5, 6, 10**9]}, "prompt", "outside the vocabulary"),
    ({"prompt": [5, -1]}, "prompt", "outside the vocabulary"),
    ({"prompt": [[5, 6]] * 5}, "prompt", "at most 4 prompts"),
    ({**OK, "stop_token_ids": [10**30]}, "stop_token_ids", "outside the vocabulary"),
    ({**OK, "stop_token_ids": [-1]}, "stop_token_ids", "outside the vocabulary"),
])
def test_bad_completion_bodies_are_400(http, body, param, words):
    check_error(http.post("/v1/completions", json=body), 400, param, words)


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [], "max_tokens": 2}, "messages", "at least one"),
    ({"max_tokens": 2}, "messages", "required"),
    ({"messages": "hi"}, "messages", "valid"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "content must be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "only text"),
    ({**CHAT_OK, "max_completion_tokens": 0}, "max_tokens", "max_tokens"),
    ({**CHAT_OK, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({**CHAT_OK, "logprobs": True, "top_logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20]"),
    ({**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({**CHAT_OK, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({**CHAT_OK, "temperature": -1}, "temperature", "temperature"),
    ({**CHAT_OK, "n": 5}, "n", "n must be"),
    ({**CHAT_OK, "chat_template": "{% for %}"}, "chat_template", "template"),
    ({"messages": [{"role": "user", "content": "x " * 400}]}, "messages", "maximum context length"),
    ({**CHAT_OK, "chat_template": "{% for i in range(10**9) %}x{% endfor %}"}, "chat_template", "template failed"),
    ({**CHAT_OK, "chat_template": "{{ messages.__class__.__mro__ }}"}, "chat_template", "unsafe"),
    ({**CHAT_OK, "chat_template": "{{ raise_exception('nope') }}"}, "messages", "nope"),
])
def test_bad_chat_bodies_are_400(http, body, param, words):
    check_error(http.post("/v1/chat/completions", json=body), 400, param, words)


@pytest.mark.parametrize("content, words", [
    (b"{not json", "not valid json"),
    (b"", "empty"),
    (b"[1, 2]", "object"),
    (b"null", "object"),
    (b'"text"', "object"),
])
def test_malformed_bodies_are_400(http, content, words):
    for path in ("/v1/completions", "/v1/chat/completions"):
        check_error(http.post(path, content=content, headers={"content-type": "application/json"}), 400, None, words)


def test_unknown_model_is_404(http):
    err = check_error(http.post("/v1/completions", json={**OK, "model": "gpt-17"}), 404, "model", "does not exist")
    assert err["code"] == "model_not_found"
    check_error(http.post("/v1/chat/completions", json={**CHAT_OK, "model": "nope"}), 404, "model")


def test_oversized_bodies_are_413(http, server):
    big = {"prompt": "word " * 20000, "max_tokens": 2}
    check_error(http.post("/v1/completions", json=big), 413, None, "limit")

    # chunked upload without a Content-Length: counted as it streams
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    check_error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_routes_and_methods_use_the_error_shape(http):
    check_error(http.get("/v1/nothing"), 404)
    check_error(http.get("/v1/completions"), 405)


def test_unknown_fields_are_ignored(http):
    assert http.post("/v1/completions", json={**OK, "some_future_field": {"a": 1}}).status_code == 200


def test_bad_request_id_header(http):
    check_error(http.post("/v1/completions", json=OK, headers={"X-Request-Id": "bad id with spaces"}), 400)


def test_openai_client_sees_typed_errors(server):
    openai = pytest.importorskip("openai")  # absent on the GPU machine
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-qwen3", prompt="hi", max_tokens=0)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-qwen3", messages=[])


def test_extreme_values_are_served_or_refused_without_harm(http):
    """Values at the edge of the integer range never reach the engine in a form that breaks it."""
    for extra in ({"top_k": 2**63}, {"top_k": 2**70}, {"seed": -(2**63)}, {"seed": 2**63 - 1}, {"temperature": 1e308},
                  {"repetition_penalty": 1e-300}, {"stop": ["x"] * 500}, {"n": 4, "max_tokens": 1}):
        r = http.post("/v1/completions", json={**OK, **extra})
        assert r.status_code == 200, (extra, r.text)
    assert http.get("/health").status_code == 200


def test_no_500_and_no_hang_under_garbage(http):
    """A spray of odd bodies: every answer is a 4xx in the error shape, within the timeout."""
    bodies = [b"{}", b'{"prompt": null}', b'{"prompt": 1}', b'{"prompt": [1.5]}', b'{"prompt": "a", "n": null}',
              b'{"prompt": "a", "stop": [1]}', b'{"prompt": "a", "stream_options": 3}', b'{"messages": [{}]}',
              b'{"prompt": "a", "max_tokens": 1e400}', b'\xff\xfe', b'{"prompt": "a"' , b'{"prompt": [[1, 2], [3.0]]}',
              b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "temperature": Infinity}',
              b'{"prompt": ' + b'[' * 5000 + b']' * 5000 + b'}', b'{"prompt": "a", "max_tokens": 1' + b'0' * 5000 + b'}',
              rb'{"prompt": "\ud800", "max_tokens": 2}']
    utility = [b"{}", b'{"prompt": null}', b'{"prompt": 1}', b'{"messages": [{}]}', b'{"messages": "hi"}', b'\xff\xfe',
               b'{"prompt": "a"', b'{"prompt": "a", "add_special_tokens": "yes"}', rb'{"prompt": "\ud800"}', b'[]',
               b'"prompt"', b'{"tokens": [1.5]}', b'{"tokens": "1 2"}', b'{"tokens": [-1]}', b'{"tokens": [99999999999]}',
               b'{"tokens": ' + b'[' * 5000 + b']' * 5000 + b'}']
    cases = [(path, body) for path in ("/v1/completions", "/v1/chat/completions") for body in bodies]
    cases += [(path, body) for path in ("/tokenize", "/detokenize") for body in utility]
    for path, body in cases:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert "error" in r.json()


# -- API key, queue bound: a contiguous engine with a key and a tiny waiting queue ---------------------------------
@pytest.fixture(scope="module")
def guarded(start_server):
    return start_server(ContiguousConfig(num_kv_slots=4096, max_model_len=MAX_LEN, max_num_seqs=1),
                        ServerConfig(api_key="sekret", max_queue=1, retry_after_s=2), names=["guarded", "alias"])


def test_api_key_is_required_when_set(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=30) as c:
        check_error(c.post("/v1/completions", json=OK), 401, None, "api key")
        check_error(c.post("/v1/completions", json=OK, headers={"Authorization": "Bearer wrong"}), 401)
        check_error(c.get("/v1/models", headers={"Authorization": "Basic sekret"}), 401)
        check_error(c.post("/tokenize", json={"prompt": "a"}), 401, None, "api key")
        check_error(c.post("/detokenize", json={"tokens": [5]}), 401, None, "api key")
        assert c.get("/openapi.json").json()["security"] == [{"bearer": []}]  # the document says a key is needed
        assert c.get("/health").status_code == 200  # health and metrics stay open, as in vLLM
        assert c.get("/metrics").status_code == 200
        ok = c.post("/v1/completions", json={**OK, "model": "alias"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["model"] == "guarded"
    openai = pytest.importorskip("openai")  # absent on the GPU machine
    client = openai.OpenAI(base_url=guarded.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert openai.OpenAI(base_url=guarded.base_url + "/v1", api_key="sekret").models.list().data[0].id == "guarded"


def test_full_queue_answers_429_with_retry_after(guarded):
    async def burst():
        """One request runs first (the engine takes one at a time), then seven arrive at once: one may wait."""
        headers = {"Authorization": "Bearer sekret"}
        body = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=guarded.base_url, timeout=60) as c:
            first = asyncio.ensure_future(c.post("/v1/completions", headers=headers, json=body))
            while 'vllm:num_requests_running{model_name="guarded"} 1.0' not in (await c.get("/metrics")).text:
                assert not first.done(), first.result().text
                await asyncio.sleep(0.005)
            rest = await asyncio.gather(*(c.post("/v1/completions", headers=headers, json=body) for _ in range(7)))
            return [await first, *rest]

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "2"
    check_error(rejected, 429, None, "busy")
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 40


# -- a dead engine loop -------------------------------------------------------------------------------------------
def test_dead_engine_loop_gives_503_and_health_503(start_server):
    server = start_server(PagedConfig(num_kv_slots=2048, max_model_len=MAX_LEN))
    engine = server.state.engine

    def broken_step():
        raise RuntimeError("simulated device failure")

    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        engine._step = broken_step
        r = c.post("/v1/completions", json=OK)
        err = check_error(r, 503, None, "simulated device failure")
        assert err["type"] == "service_unavailable"
        check_error(c.get("/health"), 503, None, "engine loop died")
        r = c.post("/v1/completions", json=OK)
        check_error(r, 503, None, "not running")
        assert "retry-after" in r.headers
        with c.stream("POST", "/v1/completions", json={**OK, "stream": True}) as s:
            assert s.status_code == 503
        assert "kvbench:engine_alive{model_name=\"tiny-qwen3\"} 0.0" in c.get("/metrics").text


def test_the_port_is_loopback_only(server):
    """The default bind address is 127.0.0.1."""
    from harness.serve.config import ServerConfig

    assert ServerConfig().host == "127.0.0.1"
    assert server.host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
