"""``POST /v1/chat/completions``: messages in, one assistant message per choice out.

The messages become one prompt through the model's chat template (harness.serve.chat), an
engine request with ``n`` samples (harness.serve.serving runs it). A stream opens every choice
with its role, then sends its content as it comes; logprobs are the chat kind
(``logprobs.content``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request as HTTPRequest

from engines.request import TokenLogprob
from harness.serve.errors import bad_request
from harness.serve.logprobs import TokenText, chat_logprobs
from harness.serve.protocol import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse
from harness.serve.serving import Generation, Serving, sse_event, sse_response, stream_updates


async def create_chat_completion(serving: Serving, body: ChatCompletionRequest, http: HTTPRequest, arrival: float,
                                 request_id: str | None) -> Any:
    """The chat completion as one response, or a stream of server-sent events when ``body.stream``."""
    model = serving.check_model(body.model)
    serving.check_sampling(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if body.tools:
        raise bad_request("tools are not supported", "tools")
    if body.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported", "tool_choice")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise bad_request(f"response_format {body.response_format.get('type')!r} is not supported (only text)",
                          "response_format")
    ids = serving.tokenizer.encode(serving.render_chat(body), add_special_tokens=False).ids
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    serving.check_prompt(ids, requested, "messages")
    max_tokens = requested if requested is not None else serving.info.max_model_len - len(ids)
    params = serving.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    gen = Generation(serving, request_id or f"chatcmpl-{uuid.uuid4().hex}", [ids], body.n)
    await serving.start(gen, [params], arrival)
    if body.stream:
        return sse_response(_stream(serving.token_text, gen, model, body), gen)
    await serving.collect(gen, http)
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)),
                          logprobs=_logprobs(serving.token_text, body, c.logprobs), finish_reason=c.finish_reason,
                          stop_reason=c.stop_reason) for c in gen.choices]
    return ChatCompletionResponse(id=gen.base_id, created=int(time.time()), model=model, choices=choices, usage=gen.usage())


async def _stream(token_text: TokenText, gen: Generation, model: str, body: ChatCompletionRequest) -> AsyncIterator[str]:
    created = int(time.time())
    continuous = bool(body.stream_options and body.stream_options.include_usage and body.stream_options.continuous_usage_stats)

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, stop_reason: Any = None,
              logprobs: dict | None = None) -> str:
        payload = {"id": gen.base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                                "stop_reason": stop_reason}]}
        if continuous:
            payload["usage"] = gen.usage_json()
        return sse_event(payload)

    for c in gen.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async for update in stream_updates(gen):
        if isinstance(update, str):
            yield update
            continue
        out, c = update
        yield chunk(c.index, {"content": out.text}, c.finish_reason if out.finished else None,
                    c.stop_reason if out.finished else None, _logprobs(token_text, body, out.logprobs or []))
    if body.stream_options and body.stream_options.include_usage:
        yield sse_event({"id": gen.base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": gen.usage_json()})


def _logprobs(token_text: TokenText, body: ChatCompletionRequest, entries: list[TokenLogprob]) -> dict | None:
    return chat_logprobs(entries, token_text, body.return_tokens_as_token_ids) if body.logprobs else None
