"""One request streamed from a server, as the ``RequestOutput``s an engine of ours would have returned.

Each chunk's tokens are stamped when the chunk arrives. A chunk carries usage when the server
supports vLLM's ``stream_options.continuous_usage_stats`` (ours and vLLM do), so the number of
tokens each chunk brings is exact; otherwise each chunk with text counts one token, and tokens
the final usage counts beyond them go to the last chunk's time. Queue time (first scheduled)
is not visible over HTTP and is left empty. A request that fails (an HTTP error, an error
event, a broken stream) ends in an output with ``FinishReason.ERROR`` and the server's message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from engines.request import FinishReason, Request, RequestOutput, SamplingParams
from harness.bench.http.server import ServerView


@dataclass
class _Sample:
    """One of a request's n samples while it streams: tokens seen, and how it ended."""

    index: int
    num_tokens: int = 0
    last_time: float | None = None  # when its last chunk with tokens arrived
    finish_reason: str | None = None
    error: str | None = None

    def fail(self, message: str) -> None:
        """An error ends the sample unless it has already finished."""
        if self.finish_reason is None and self.error is None:
            self.error = message


@dataclass
class _Ending:
    """What the final usage chunk says about the whole request."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int | None = None
    samples: list[_Sample] = field(default_factory=list)


class StreamClient:
    """Streams requests to ``/v1/completions`` (or ``/v1/chat/completions``) over one aiohttp session.

    Requests carry ``X-Request-Id: TAG-ID``, which our server uses for the engine's request id, so its KV log's
    sequences map back to the workload's (``engine_id``).
    """

    def __init__(self, session, view: ServerView, endpoint: str, tokenizer, tag: str, text: bool) -> None:
        self.session, self.view, self.endpoint, self.tokenizer, self.tag = session, view, endpoint, tokenizer, tag
        self.text = endpoint == "chat" or text  # the server counts the prompt: its usage says the length
        self.path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"

    def engine_id(self, request_id: str) -> str:
        return f"{self.tag}-{request_id}"

    def body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.view.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "n": params.n, "ignore_eos": params.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.tokenizer.decode(prompt_ids, skip_special_tokens=False)}]
        elif self.text:
            body["prompt"] = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        else:
            body["prompt"] = list(prompt_ids)
        return body

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """The request's outputs as its chunks arrive; every sample's last output is finished."""
        samples = [_Sample(i) for i in range(request.sampling_params.n)]
        ending = _Ending(samples=samples)
        headers = {**self.view.headers, "X-Request-Id": self.engine_id(request.request_id)}
        try:
            async with self.session.post(self.view.base_url + self.path, headers=headers,
                                         json=self.body(request.prompt_token_ids, request.sampling_params)) as r:
                if r.status != 200:
                    message = f"HTTP {r.status}: {_message((await r.read()).decode(errors='replace'))}"
                    for s in samples:
                        s.fail(message)
                else:
                    async for out in self._chunks(request, r, ending):
                        yield out
        except Exception as e:  # noqa: BLE001 - a transport failure fails this request, not the run
            for s in samples:
                s.fail(f"{type(e).__name__}: {e}")
        for out in self._endings(request, ending, time.perf_counter()):
            yield out

    async def _chunks(self, request: Request, response, ending: _Ending) -> AsyncIterator[RequestOutput]:
        counted = 0  # completion tokens attributed so far (continuous usage)
        async for raw in response.content:  # one line at a time
            line = raw.decode(errors="replace")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                for s in ending.samples:
                    s.fail(_message(json.dumps(chunk)))
                continue
            usage = chunk.get("usage")
            for choice in chunk.get("choices", []):
                s = ending.samples[choice.get("index", 0)]
                if usage is not None:
                    total = int(usage.get("completion_tokens", 0))
                    k, counted = max(0, total - counted), max(counted, total)
                else:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    k = 1 if text else 0
                s.num_tokens += k
                if choice.get("finish_reason") is not None:
                    s.finish_reason = s.finish_reason or choice["finish_reason"]
                if k:
                    s.last_time = now
                    yield RequestOutput(request.request_id, s.index, [], [now] * k)
            if usage is not None and not chunk.get("choices"):
                details = usage.get("prompt_tokens_details") or {}
                ending.cached_tokens = int(details.get("cached_tokens") or 0)
                ending.prompt_tokens = int(usage.get("prompt_tokens", 0))
                ending.completion_tokens = int(usage.get("completion_tokens", 0))

    def _endings(self, request: Request, ending: _Ending, now: float) -> list[RequestOutput]:
        """Each sample's finished output, with the tokens the final usage counts beyond those seen (n = 1 without
        per-chunk usage) at its last chunk's time, and the prompt's length as the server counted it when it was
        sent text."""
        outs = []
        for s in ending.samples:
            extra = 0
            if len(ending.samples) == 1 and ending.completion_tokens is not None:
                extra = max(0, ending.completion_tokens - s.num_tokens)
            if s.error is None and s.finish_reason is None:
                s.error = "the stream ended without a finish reason"
            outs.append(RequestOutput(
                request.request_id, s.index, [], [s.last_time or now] * extra, finished=True,
                finish_reason=FinishReason.ERROR if s.error is not None else _reason(s.finish_reason), error=s.error,
                num_prompt_tokens=ending.prompt_tokens if self.text else 0, num_cached_tokens=ending.cached_tokens))
        return outs


def _reason(text: str | None) -> FinishReason:
    try:
        return FinishReason(text)
    except ValueError:  # a server's own reason (e.g. "tool_calls"): the sample stopped
        return FinishReason.STOP


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except Exception:  # noqa: BLE001
        return text[:300]
