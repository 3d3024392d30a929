"""The OpenAI API of `harness serve`, over real HTTP (httpx and the official openai client) on loopback."""

from __future__ import annotations

import json

import httpx
import pytest

from engines.config import ContiguousConfig, PagedConfig
from engines.detokenizer import load_tokenizer
from harness.serve.config import ServerConfig

MAX_LEN = 512
PROMPT_IDS = [11, 250, 37, 801, 64, 5, 999, 123, 77, 42, 300, 19]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(PagedConfig(num_kv_slots=32768, max_model_len=MAX_LEN), ServerConfig(max_n=8))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")  # the GPU machine has no openai package: these tests skip there
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def sse(lines) -> list[dict | str]:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"not an SSE line: {line!r}"
    return events


def test_models_lists_the_served_name(http):
    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-qwen3"]
    assert body["data"][0]["max_model_len"] == MAX_LEN


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert "version" in http.get("/version").json()


def test_completion_usage_counts_and_exact_length(http, server):
    tok = load_tokenizer(server.model_dir)
    prompt = "The quick brown fox jumps over the lazy dog"
    r = http.post("/v1/completions", json={"model": "tiny-qwen3", "prompt": prompt, "max_tokens": 9,
                                            "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny-qwen3"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tok.encode(prompt).ids)
    assert usage["completion_tokens"] == 9
    assert usage["total_tokens"] == usage["prompt_tokens"] + 9
    assert r.headers["x-request-id"] == body["id"]


def test_stream_matches_non_stream_and_reports_usage(http):
    body = {"prompt": PROMPT_IDS, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()
    with http.stream("POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert usage_chunk["usage"]["prompt_tokens"] == len(PROMPT_IDS)
    token_chunks = chunks[:-1]
    assert 1 <= len(token_chunks) <= 12  # one chunk per engine step, fewer when the stream fell behind (merged)
    assert all("usage" not in c for c in token_chunks)
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * (len(token_chunks) - 1) + ["length"]


def test_continuous_usage_counts_every_chunk(http):
    body = {"prompt": PROMPT_IDS, "max_tokens": 5, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = sse(r.iter_lines())
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    # every token chunk counts what was sent so far (a merged chunk carries several), then the usage chunk
    assert counts[-2:] == [5, 5] and counts[0] >= 1
    assert all(a < b for a, b in zip(counts[:-1], counts[1:-1]))


def test_greedy_is_deterministic_and_seeded_sampling_repeats(http):
    body = {"prompt": PROMPT_IDS, "max_tokens": 10, "ignore_eos": True}
    a = http.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    b = http.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    assert a == b
    s1 = http.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 7, "top_k": 50, "top_p": 0.9,
                                             "min_p": 0.01, "presence_penalty": 0.5, "frequency_penalty": 0.2,
                                             "repetition_penalty": 1.1}).json()
    s2 = http.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 7, "top_k": 50, "top_p": 0.9,
                                             "min_p": 0.01, "presence_penalty": 0.5, "frequency_penalty": 0.2,
                                             "repetition_penalty": 1.1}).json()
    assert s1["choices"][0]["text"] == s2["choices"][0]["text"]
    assert s1["usage"]["completion_tokens"] == 10


def test_n_samples_and_batched_prompts_get_indexed_choices(http):
    r = http.post("/v1/completions", json={"prompt": [PROMPT_IDS, PROMPT_IDS[:5], PROMPT_IDS[2:9]], "n": 3,
                                            "max_tokens": 4, "temperature": 1.0, "seed": 1, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(c["index"] for c in body["choices"]) == list(range(9))
    assert body["usage"]["completion_tokens"] == 9 * 4
    assert body["usage"]["prompt_tokens"] == len(PROMPT_IDS) + 5 + 7  # each prompt once, whatever n
    strings = http.post("/v1/completions", json={"prompt": ["hello", "there", "friend"], "max_tokens": 2}).json()
    assert [c["index"] for c in strings["choices"]] == [0, 1, 2]
    # streamed: every choice index appears and finishes
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT_IDS, "n": 4, "max_tokens": 3, "ignore_eos": True,
                                                       "stream": True}) as r:
        events = sse(r.iter_lines())
    finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in events[:-1]
                if c["choices"][0]["finish_reason"]}
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}


def test_stop_string_truncates_and_is_reported(http):
    body = {"prompt": PROMPT_IDS, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    # a stop string taken from the middle of the greedy text: the output must end right before it
    start = next(i for i in range(3, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].strip() == text[i:i + 2])
    stop = text[start:start + 2]
    expected = text[: text.find(stop)]
    for stream in (False, True):
        if not stream:
            choice = http.post("/v1/completions", json={**body, "stop": [stop, "never-seen-stop"]}).json()["choices"][0]
            got = choice["text"]
        else:
            with http.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as r:
                events = sse(r.iter_lines())
            got = "".join(e["choices"][0]["text"] for e in events[:-1])
            choice = events[-2]["choices"][0]
        assert got == expected, (stop, text)
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    kept = http.post("/v1/completions", json={**body, "stop": stop, "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == expected + stop


def test_echo_prepends_the_prompt(http):
    r = http.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 2, "echo": True, "ignore_eos": True})
    assert r.json()["choices"][0]["text"].startswith("hello world")


def test_chat_renders_the_template_and_streams(http, server):
    tok = load_tokenizer(server.model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    r = http.post("/v1/chat/completions", json={"model": "tiny-qwen3", "messages": messages, "max_tokens": 6,
                                                 "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False).ids)
    assert body["usage"]["completion_tokens"] == 6
    with http.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                                            "ignore_eos": True, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
        events = sse(r.iter_lines())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["object"] == "chat.completion.chunk"
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[1:-2])
    assert content == body["choices"][0]["message"]["content"]
    assert events[-2]["usage"]["completion_tokens"] == 6 and events[-2]["choices"] == []
    # content parts are joined like strings
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    r = http.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 2})
    assert r.status_code == 200


def test_openai_client_completions_and_chat(oai):
    c = oai.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=7, temperature=0,
                               extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 7
    streamed = list(oai.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=7, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.choices[0].text
    assert streamed[-1].usage.completion_tokens == 7

    chat = oai.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "Say hi"}],
                                       max_tokens=5, n=2, temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    assert [ch.index for ch in chat.choices] == [0, 1]
    assert chat.usage.completion_tokens == 10
    stream = oai.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "Say hi"}],
                                         max_tokens=5, stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen3"]
    assert oai.models.retrieve("tiny-qwen3").id == "tiny-qwen3"
    with pytest.raises(pytest.importorskip("openai").NotFoundError):
        oai.models.retrieve("other")


def test_metrics_have_vllm_names(http):
    http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 3, "ignore_eos": True})
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_success_total", "kvbench:batch_size_bucket",
                 "vllm:cache_config_info"):
        assert f"\n{name}" in text, name
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels.get("le")}
    assert values["vllm:generation_tokens_total"] >= 3
    assert values["vllm:prompt_tokens_total"] >= len(PROMPT_IDS)


def test_prefix_cache_hits_show_in_metrics(http):
    from prometheus_client.parser import text_string_to_metric_families

    def hits():
        text = http.get("/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}["vllm:prefix_cache_hits_total"]

    shared = list(range(100, 164))  # four whole blocks of 16
    before = hits()
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": shared + [7], "max_tokens": 2}).status_code == 200
    assert hits() - before >= 64


@pytest.fixture(scope="module")
def contiguous_server(start_server):
    return start_server(ContiguousConfig(num_kv_slots=8192, max_model_len=MAX_LEN, reservation="pow2"))


def test_another_engine_by_config_gives_the_same_greedy_text(http, contiguous_server):
    body = {"prompt": PROMPT_IDS, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    paged = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with httpx.Client(base_url=contiguous_server.base_url, timeout=60) as c:
        info = c.get("/kvbench/info").json()
        assert info["engine"] == "contiguous" and info["engine_config"]["reservation"] == "pow2"
        contiguous = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert contiguous == paged


def test_the_server_makes_the_text_when_the_engine_need_not(http, server, monkeypatch):
    """Without stop strings the engine only makes tokens and the server detokenizes; the text is the same as
    when the engine detokenizes (a stop string that never matches makes it), streamed or not, for n > 1 too."""
    sent = []
    add = server.state.loop.add
    monkeypatch.setattr(server.state.loop, "add", lambda request: sent.append(request) or add(request))
    body = {"prompt": PROMPT_IDS, "max_tokens": 40, "temperature": 0.8, "seed": 11, "n": 2, "ignore_eos": True}
    here = http.post("/v1/completions", json=body).json()
    there = http.post("/v1/completions", json={**body, "stop": ["\u0000never\u0001"]}).json()
    assert [r.sampling_params.detokenize for r in sent] == [False, True]
    assert [c["text"] for c in here["choices"]] == [c["text"] for c in there["choices"]]
    assert all(c["text"] for c in here["choices"])
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse(r.iter_lines())
    streamed = ["".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) for i in (0, 1)]
    assert streamed == [c["text"] for c in there["choices"]]


# -- vLLM's utility routes and the OpenAPI document -------------------------------------------------------------------
def test_tokenize_gives_the_ids_a_completion_computes_and_detokenize_gives_them_back(http):
    text = "The quick brown fox"
    tok = http.post("/tokenize", json={"prompt": text, "return_token_strs": True})
    assert tok.status_code == 200
    body = tok.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] == MAX_LEN
    done = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == body["count"]
    same = http.post("/v1/completions", json={"prompt": body["tokens"], "max_tokens": 1, "temperature": 0}).json()
    first = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "temperature": 0}).json()
    assert same["choices"][0]["text"] == first["choices"][0]["text"]  # the same ids: the same greedy token
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    assert "token_strs" not in http.post("/tokenize", json={"prompt": text}).json()  # only when asked for


def test_tokenize_with_messages_gives_the_ids_a_chat_completion_computes(http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert body["count"] == chat["usage"]["prompt_tokens"] == len(body["tokens"])
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"]  # the template's assistant header is what the generation prompt adds


def test_bad_tokenize_and_detokenize_bodies_are_4xx_naming_the_field(http):
    for path, body, status, param in (
        ("/detokenize", {"tokens": [5, 10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [5], "model": "nope"}, 404, "model"),
        ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {}, 400, "prompt"),
    ):
        r = http.post(path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)


def test_the_openapi_document_describes_every_route_and_body(http):
    doc = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models", "/version"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    completions = doc["paths"]["/v1/completions"]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionRequest"}
    assert {"prompt", "max_tokens", "stream", "top_k"} <= set(schemas["CompletionRequest"]["properties"])
    assert "usage" in schemas["CompletionResponse"]["properties"]
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    missing = [r for r in refs if r.removeprefix("#/components/schemas/") not in schemas]
    assert refs and not missing, missing  # every reference resolves, so a client generator or fuzzer can use it
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def test_http_answers_are_counted_by_route_and_status(http):
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[tuple[str, str], float]:
        families = text_string_to_metric_families(http.get("/metrics").text)
        return {(s.labels["route"], s.labels["status"]): s.value for f in families for s in f.samples
                if s.name == "kvbench:http_requests_total"}
    before = counts()
    assert http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 2}).status_code == 200
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    assert http.post("/tokenize", json={}).status_code == 400
    assert http.get("/no/such/route").status_code == 404
    after = counts()
    grew = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert grew(("/v1/completions", "200")) == 2 and grew(("/tokenize", "400")) == 1 and grew(("unmatched", "404")) == 1
