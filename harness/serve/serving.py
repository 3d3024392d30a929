"""What the OpenAI endpoints share: engine requests in, outputs back, as JSON or server-sent events.

The generation endpoints (harness.serve.completions, harness.serve.chat_completions) check
a body with ``Serving`` and turn it into one engine request per prompt, each with the body's
sampling parameters; the engine runs the ``n`` samples (a ``Generation``). Outputs come back
from the engine through one asyncio queue per HTTP request. A stream sends one ``data:``
chunk per new token of a choice (text may be empty while a possible stop string is held
back), the finish reason with the last one, then the usage chunk if asked
(``stream_options.include_usage``), then ``data: [DONE]``. A client that goes away (a
cancelled stream, or a disconnect while a non-streamed answer is computed) aborts its engine
requests at once, which frees their KV memory. ``Serving`` also answers ``/v1/models``,
``/tokenize`` and ``/detokenize``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from tokenizers import Tokenizer

from engines.detokenizer import SampleStream
from engines.request import FinishReason, Request, RequestError, RequestOutput, SamplingParams, TokenLogprob
from harness.serve.chat import ChatTemplate
from harness.serve.config import ServerConfig
from harness.serve.engine_loop import EngineDead, EngineLoop, QueueFull
from harness.serve.errors import APIError, bad_request, error_body
from harness.serve.logprobs import TokenText
from harness.serve.metrics import ServerMetrics
from harness.serve.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    Usage,
    _Sampling,
)

log = logging.getLogger(__name__)

SEED_RANGE = (-(2**63), 2**63 - 1)
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort",
                  FinishReason.ERROR: "error"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its requests were aborted."""


@dataclass
class ModelInfo:
    names: list[str]  # names clients may ask for; the first is the one reported
    root: str  # the model directory
    max_model_len: int
    vocab_size: int
    engine: str
    eos_token_ids: tuple[int, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Choice:
    """One choice of a generation (a sample of one prompt), as it has come back so far."""

    index: int
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    text_stream: SampleStream | None = None  # set when this server detokenizes the choice, not the engine
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of its tokens, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # of its prompt (echo), when asked for
    offset: int = 0  # characters of the choice's logprob tokens streamed so far (their text_offset)


class Generation:
    """The engine requests of one HTTP request and what has come back for them."""

    def __init__(self, serving: "Serving", base_id: str, prompts: list[list[int]], n: int,
                 score_only: bool = False) -> None:
        self.serving, self.base_id, self.prompts, self.n = serving, base_id, prompts, n
        # echo with max_tokens 0: the engine samples one token that nobody sees (it scores the prompt only)
        self.score_only = score_only
        self.ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.prompt_of = {rid: i for i, rid in enumerate(self.ids)}
        self.queue: asyncio.Queue[tuple[str, list[RequestOutput]]] = asyncio.Queue()
        self.choices = [Choice(i) for i in range(len(prompts) * n)]
        self.open = len(self.choices)
        self.cached_tokens = 0
        self.done = False
        self.added: list[str] = []
        self.prompt_tokens = sum(len(p) for p in prompts)

    def choice_of(self, out: RequestOutput) -> Choice:
        return self.choices[self.prompt_of[out.request_id] * self.n + out.index]

    def apply(self, out: RequestOutput) -> Choice:
        c = self.choice_of(out)
        if out.index == 0 and out.num_cached_tokens:
            self.cached_tokens += out.num_cached_tokens
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if self.score_only:
            out.new_token_ids, out.text, out.logprobs = [], "", None
        if out.logprobs:
            c.logprobs += out.logprobs
        c.tokens += len(out.new_token_ids)
        if c.text_stream is not None and out.new_token_ids:
            out.text = "".join(c.text_stream.append(t) for t in out.new_token_ids)
        if out.text:
            c.text.append(out.text)
        if out.finished and c.finish_reason is None:
            c.finish_reason = FINISH_REASONS.get(out.finish_reason, "stop") if out.finish_reason else "stop"
            c.stop_reason = out.stop_reason
            c.error = out.error
            self.open -= 1
        return c

    def usage(self) -> Usage:
        return Usage.model_validate(self.usage_json())

    def usage_json(self) -> dict[str, Any]:
        """The usage as a stream chunk carries it (built as a plain dict: streams with continuous usage send it
        with every chunk, and a pydantic round trip per chunk costs more than the rest of the chunk)."""
        prompt = self.prompt_tokens
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    async def outputs(self) -> AsyncIterator[list[RequestOutput]]:
        """The engine's outputs as they come; what piled up while the consumer was busy (sending the last
        chunk, or waiting for the event loop) comes as one merged output per sample, so a stream under load
        sends fewer, larger chunks instead of falling further behind."""
        while self.open:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            yield batch[0][1] if len(batch) == 1 else _merged(outs for _, outs in batch)

    def close(self) -> None:
        """Abort what has not finished (the client left) and stop listening."""
        if not self.done:
            unfinished = {self.ids[c.index // self.n] for c in self.choices if c.finish_reason is None}
            for rid in unfinished & set(self.added):
                self.serving.loop.abort(rid)
        self.done = True
        for rid in self.ids:
            self.serving.queues.pop(rid, None)


def _merged(batches: Iterable[list[RequestOutput]]) -> list[RequestOutput]:
    """Outputs of consecutive steps as one output per sample, in order of first appearance."""
    merged: dict[tuple[str, int], RequestOutput] = {}
    for outs in batches:
        for out in outs:
            key = (out.request_id, out.index)
            merged[key] = merged[key].followed_by(out) if key in merged else out
    return list(merged.values())


class Serving:
    """The engine loop, tokenizer, chat template and limits that every endpoint uses, and the checks and steps
    the generation endpoints share."""

    def __init__(self, loop: EngineLoop, tokenizer: Tokenizer, template: ChatTemplate, info: ModelInfo,
                 cfg: ServerConfig, metrics: ServerMetrics) -> None:
        self.loop, self.tokenizer, self.template, self.info, self.cfg, self.metrics = loop, tokenizer, template, info, cfg, metrics
        self.queues: dict[str, asyncio.Queue] = {}
        self.aio_loop: asyncio.AbstractEventLoop | None = None
        self.token_text = TokenText(tokenizer)

    # -- engine thread -> event loop ----------------------------------------------------------------
    def deliver(self, grouped: dict[str, list[RequestOutput]]) -> None:
        """Called once per step: on the event loop (an engine process), or on the engine loop's thread."""
        aio = self.aio_loop
        if aio is None or aio.is_closed():
            return
        if asyncio._get_running_loop() is aio:
            self._dispatch(grouped)
            return
        try:
            aio.call_soon_threadsafe(self._dispatch, grouped)
        except RuntimeError:  # the event loop closed meanwhile
            pass

    def _dispatch(self, grouped: dict[str, list[RequestOutput]]) -> None:
        for rid, outs in grouped.items():
            q = self.queues.get(rid)
            if q is not None:
                q.put_nowait((rid, outs))

    # -- /v1/models, /tokenize, /detokenize ----------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=self.info.created, root=self.info.root,
                                         max_model_len=self.info.max_model_len) for name in self.info.names])

    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """The ids a completion of ``prompt`` (or a chat completion of ``messages``) would compute, as vLLM's
        ``/tokenize`` gives them: the same encoding and chat template as the generation routes."""
        self.check_model(body.model)
        text = self.render_chat(body) if isinstance(body, TokenizeChatRequest) else body.prompt
        encoding = self.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(encoding.ids), max_model_len=self.info.max_model_len, tokens=encoding.ids,
                                token_strs=encoding.tokens if body.return_token_strs else None)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of ``tokens``, special tokens included (vLLM's ``/detokenize``): a tokenize round trip."""
        self.check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise bad_request(f"tokens: {bad} is outside the vocabulary [0, {self.info.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens, skip_special_tokens=False))

    # -- shared checks --------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        if name is None or name in self.info.names:
            return self.info.names[0]
        raise APIError(404, f"The model `{name}` does not exist. This server serves: {', '.join(self.info.names)}",
                       param="model", code="model_not_found")

    def render_chat(self, body: ChatCompletionRequest | TokenizeChatRequest) -> str:
        """The prompt text of ``body.messages`` under the chat template: the same for a chat completion and for
        ``/tokenize``."""
        if not body.messages:
            raise bad_request("messages must hold at least one message", "messages")
        return self.template.render(body.messages, add_generation_prompt=body.add_generation_prompt,
                                    continue_final_message=body.continue_final_message, template=body.chat_template,
                                    kwargs=body.chat_template_kwargs)

    def check_sampling(self, body: _Sampling) -> None:
        """Refuse what neither generation endpoint supports among the sampling fields they share."""
        if body.model_extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))
        if not 1 <= body.n <= self.cfg.max_n:
            raise bad_request(f"n must be between 1 and {self.cfg.max_n}, got {body.n}", "n")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of is not supported (it may only equal n)", "best_of")
        if body.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if body.min_tokens:
            raise bad_request("min_tokens is not supported by this engine", "min_tokens")
        if not body.skip_special_tokens:
            raise bad_request("skip_special_tokens=false is not supported: special tokens are always skipped",
                              "skip_special_tokens")
        if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
            raise bad_request(f"seed must be a 64-bit signed integer, got {body.seed}", "seed")
        bad_stop = next((t for t in body.stop_token_ids or () if not 0 <= t < self.info.vocab_size), None)
        if bad_stop is not None:
            raise bad_request(f"stop_token_ids: {bad_stop} is outside the vocabulary [0, {self.info.vocab_size})",
                              "stop_token_ids")
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options can only be set when stream is true", "stream_options")

    def sampling_params(self, body: _Sampling, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        fields = {"max_tokens": max_tokens, "n": body.n, "stop": body.stop or (), "logprobs": logprobs,
                  "prompt_logprobs": prompt_logprobs,
                  "stop_token_ids": body.stop_token_ids or (), "ignore_eos": body.ignore_eos, "seed": body.seed,
                  "include_stop_str_in_output": body.include_stop_str_in_output,
                  "detokenize": bool(body.stop)}  # without stop strings, this server makes the text
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            value = getattr(body, name)
            fields[name] = default if value is None else value
        if isinstance(fields["top_k"], int) and fields["top_k"] > self.info.vocab_size:
            fields["top_k"] = self.info.vocab_size  # the same sampling, within the engine's integer range
        try:
            return SamplingParams(**fields)
        except RequestError as e:
            raise bad_request(str(e), _param_named(str(e), fields)) from e

    def _detokenize_here(self, gen: Generation, params: list[SamplingParams]) -> None:
        """Text for the choices whose requests have no stop strings is made here, as the tokens arrive: the
        engine then only makes tokens (``detokenize=False``), and its process spends no time on text. With stop
        strings the engine detokenizes, since it must stop there. The same incremental decoder either way."""
        for i, (ids, p) in enumerate(zip(gen.prompts, params)):
            if p.detokenize:
                continue
            for j in range(gen.n):
                gen.choices[i * gen.n + j].text_stream = SampleStream(
                    self.tokenizer, dataclasses.replace(p, detokenize=True), len(ids), self.info.eos_token_ids,
                    self.info.max_model_len)

    def check_prompt(self, ids: list[int], max_tokens: int | None, where: str) -> None:
        limit = self.info.max_model_len
        if not ids:
            raise bad_request(f"{where} is empty", where)
        bad = None
        if min(ids) < 0 or max(ids) >= self.info.vocab_size:  # min and max loop in C; find the culprit only when needed
            bad = next(t for t in ids if t < 0 or t >= self.info.vocab_size)
        if bad is not None:
            raise bad_request(f"{where}: token id {bad} is outside the vocabulary [0, {self.info.vocab_size})", where)
        if len(ids) >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                              f"{len(ids)} tokens, which leaves no room to generate.", where, code="context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion). "
                              "Please reduce the prompt or max_tokens.", "max_tokens", code="context_length_exceeded")

    # -- submitting -----------------------------------------------------------------------------------
    async def start(self, gen: Generation, params: list[SamplingParams], arrival: float) -> None:
        """Hand ``gen``'s requests to the engine and wait until it took them all (a refusal aborts the others)."""
        self._detokenize_here(gen, params)
        if self.loop.error is not None or not self.loop.alive:
            self.metrics.reject("engine_dead")
            raise APIError(503, "the engine is not running" + (f": {self.loop.error}" if self.loop.error else ""),
                           headers={"Retry-After": str(self.cfg.retry_after_s)})
        for rid in gen.ids:
            self.queues[rid] = gen.queue
        try:
            for rid, ids, p in zip(gen.ids, gen.prompts, params):
                request = Request(rid, ids, p, arrival_time=arrival)
                try:
                    future = self.loop.add(request)
                except QueueFull as e:
                    self.metrics.reject("queue_full")
                    raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full",
                                   headers={"Retry-After": str(self.cfg.retry_after_s)}) from e
                except EngineDead as e:
                    self.metrics.reject("engine_dead")
                    raise APIError(503, f"the engine is not running: {e}", headers={"Retry-After": str(self.cfg.retry_after_s)}) from e
                gen.added.append(rid)
                try:
                    await asyncio.wrap_future(future)
                except RequestError as e:
                    self.metrics.reject("bad_request")
                    message = str(e)
                    raise bad_request(message, "prompt" if "prompt" in message or "fit" in message else None) from e
                except EngineDead as e:
                    raise APIError(503, f"the engine is not running: {e}", headers={"Retry-After": str(self.cfg.retry_after_s)}) from e
        except BaseException:
            gen.close()
            raise

    # -- answering ------------------------------------------------------------------------------------
    async def collect(self, gen: Generation, http: HTTPRequest) -> None:
        """All outputs of a non-streamed request; a client that disconnects meanwhile aborts it."""

        async def consume() -> None:
            async for outs in gen.outputs():
                for out in outs:
                    gen.apply(out)

        async def disconnected() -> None:
            while True:
                message = await http.receive()
                if message["type"] == "http.disconnect":
                    return

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                if not task.done():
                    task.cancel()
            if work.done() and not work.cancelled() and work.exception() is None:
                gen.done = True
            gen.close()
        if not work.done() or work.cancelled():
            raise ClientGone()
        work.result()
        failed = [c for c in gen.choices if c.finish_reason == "error"]
        if failed:
            status = 503 if self.loop.error else 500
            raise APIError(status, f"generation failed: {failed[0].error}")


# -- server-sent events --------------------------------------------------------------------------------------
async def stream_updates(gen: Generation) -> AsyncIterator[tuple[RequestOutput, Choice] | str]:
    """Each engine output that shows something, with its choice's state; a failed generation
    as a ready error event instead (streams end in-band, never with a 500)."""
    async for outs in gen.outputs():
        for out in outs:
            c = gen.apply(out)
            if c.error and out.finish_reason == FinishReason.ERROR:
                yield sse_event(error_body(500, f"generation failed: {c.error}"))
            elif out.new_token_ids or out.finished:
                yield out, c


def sse_response(events: AsyncIterator[str], gen: Generation) -> StreamingResponse:
    """``events`` as a server-sent event stream, ended by ``data: [DONE]``; ``gen`` is closed however it ends."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
            yield "data: [DONE]\n\n"
            gen.done = not gen.open
        finally:  # a cancelled stream (the client left) lands here too
            gen.close()

    return _EventStream(gen, body(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": gen.base_id})


class _EventStream(StreamingResponse):
    """A stream that aborts its requests however it ends, even if the client left before the first chunk
    (the body generator then never starts, so its own ``finally`` cannot run)."""

    def __init__(self, gen: Generation, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _param_named(message: str, fields: dict[str, Any]) -> str | None:
    """The sampling field a RequestError message is about (its messages start with the field's name)."""
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name) or message.startswith(f"{name} "):
            return name
    if message.startswith("stop strings"):
        return "stop"
    return None
