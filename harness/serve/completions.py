"""``POST /v1/completions``, OpenAI's legacy completions: prompts in, text out, with echo and the legacy logprobs.

The prompt is a string, a list of strings, a list of token ids or a list of them: one engine
request per prompt, each with ``n`` samples (harness.serve.serving runs them). ``echo`` puts
the prompt before each choice's text; with ``max_tokens`` 0 it only scores the prompt (an
evaluation harness's loglikelihood).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request as HTTPRequest
from tokenizers import Tokenizer

from engines.request import TokenLogprob
from harness.serve.errors import bad_request
from harness.serve.logprobs import TokenText, completion_logprobs
from harness.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from harness.serve.serving import Choice, Generation, Serving, sse_event, sse_response, stream_updates


async def create_completion(serving: Serving, body: CompletionRequest, http: HTTPRequest, arrival: float,
                            request_id: str | None) -> Any:
    """The completion as one response, or a stream of server-sent events when ``body.stream``."""
    model = serving.check_model(body.model)
    serving.check_sampling(body)
    if body.suffix is not None:
        raise bad_request("suffix is not supported", "suffix")
    prompts = _prompts(serving, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    score_only = body.echo and max_tokens == 0  # score the prompt (an evaluation harness's loglikelihood)
    params = serving.sampling_params(body, max(max_tokens, 1) if score_only else max_tokens, body.logprobs,
                                     body.logprobs if body.echo else None)
    for i, ids in enumerate(prompts):
        serving.check_prompt(ids, params.max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    gen = Generation(serving, request_id or f"cmpl-{uuid.uuid4().hex}", prompts, body.n, score_only)
    await serving.start(gen, [params] * len(prompts), arrival)
    echo = [_echo_text(serving.tokenizer, body.prompt, i) for i in range(len(prompts))] if body.echo else None
    if body.stream:
        return sse_response(_stream(serving.token_text, gen, model, body, echo), gen)
    await serving.collect(gen, http)
    choices = [CompletionChoice(index=c.index, text=(echo[c.index // gen.n] if echo else "") + "".join(c.text),
                                logprobs=_logprobs(serving.token_text, gen, c, body, c.logprobs, echo is not None),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in gen.choices]
    return CompletionResponse(id=gen.base_id, created=int(time.time()), model=model, choices=choices, usage=gen.usage())


def _logprobs(token_text: TokenText, gen: Generation, c: Choice, body: CompletionRequest, entries: list[TokenLogprob],
              echo: bool) -> dict[str, list] | None:
    """The legacy logprobs of ``entries`` (a chunk's, or the whole choice's), after the prompt's when ``echo``
    and not yet sent; None when the request did not ask."""
    if body.logprobs is None:
        return None
    items: list[tuple[int, TokenLogprob | None]] = []
    if echo and c.prompt_logprobs is not None:
        prompt = gen.prompts[c.index // gen.n]
        items += [(t, lp) for t, lp in zip(prompt, c.prompt_logprobs)]
        c.prompt_logprobs = None  # sent
    items += [(e.token_id, e) for e in entries]
    out = completion_logprobs(items, token_text, c.offset, body.return_tokens_as_token_ids)
    if items:
        c.offset = out["text_offset"][-1] + len(out["tokens"][-1])
    return out


def _prompts(serving: Serving, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif _token_ids(prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", "prompt")
    if len(items) > serving.cfg.max_prompts:
        raise bad_request(f"at most {serving.cfg.max_prompts} prompts per request, got {len(items)}", "prompt")
    return [serving.tokenizer.encode(p, add_special_tokens=True).ids if isinstance(p, str) else list(p) for p in items]


def _token_ids(prompt: Any) -> bool:
    """Whether a validated prompt is one list of token ids: its members' items are all of one type, so the first
    item tells (a loop over a long prompt's every id cost more than anything else per request)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


def _echo_text(tokenizer: Tokenizer, prompt: Any, i: int) -> str:
    if isinstance(prompt, str):
        return prompt
    if _token_ids(prompt):
        return tokenizer.decode(prompt, skip_special_tokens=True)
    item = prompt[i]
    return item if isinstance(item, str) else tokenizer.decode(item, skip_special_tokens=True)


async def _stream(token_text: TokenText, gen: Generation, model: str, body: CompletionRequest,
                  echo: list[str] | None) -> AsyncIterator[str]:
    created = int(time.time())
    continuous = bool(body.stream_options and body.stream_options.include_usage and body.stream_options.continuous_usage_stats)
    echoed: set[int] = set()
    async for update in stream_updates(gen):
        if isinstance(update, str):
            yield update
            continue
        out, c = update
        text = out.text
        first = echo is not None and c.index not in echoed
        if first:
            echoed.add(c.index)
            text = echo[c.index // gen.n] + text
        logprobs = _logprobs(token_text, gen, c, body, out.logprobs or [], first)
        chunk = {"id": gen.base_id, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": c.index, "text": text, "logprobs": logprobs,
                              "finish_reason": c.finish_reason if out.finished else None,
                              "stop_reason": c.stop_reason if out.finished else None}]}
        if continuous:
            chunk["usage"] = gen.usage_json()
        yield sse_event(chunk)
    if body.stream_options and body.stream_options.include_usage:
        yield sse_event({"id": gen.base_id, "object": "text_completion", "created": created, "model": model, "choices": [],
                         "usage": gen.usage_json()})
