"""Log-probabilities in OpenAI's two shapes, from the engine's ``TokenLogprob`` lists.

- ``/v1/completions`` (the legacy shape): parallel lists ``tokens``, ``token_logprobs``,
  ``top_logprobs`` (a dict of the ``logprobs`` most likely tokens and the chosen one) and
  ``text_offset`` (each token's character offset in the choice's text); with ``echo``, the
  prompt's tokens first, the very first with ``None`` (nothing precedes it).
- ``/v1/chat/completions``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``.

A token's text is its id decoded alone (as vLLM does), or ``token_id:<id>`` with vLLM's
``return_tokens_as_token_ids``. Values are the engine's (``engine.logprobs_mode``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from tokenizers import Tokenizer

from engines.request import TokenLogprob


class TokenText:
    """Token id -> its text, cached (a stream asks for the same ids again and again)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.text: Callable[[int], str] = lru_cache(maxsize=65536)(
            lambda i: tokenizer.decode([i], skip_special_tokens=False))

    def __call__(self, token_id: int, as_ids: bool = False) -> str:
        return f"token_id:{token_id}" if as_ids else self.text(token_id)


def completion_logprobs(items: list[tuple[int, TokenLogprob | None]], text: TokenText, offset: int, as_ids: bool
                        ) -> dict[str, list[Any]]:
    """The legacy shape of ``items`` (token id, its log-probability; ``None`` for the prompt's first token, which
    has none), whose first token starts at character ``offset`` of the choice's text."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in items:
        token = text(token_id, as_ids)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(e.logprob)
        top = {text(i, as_ids): lp for i, lp in e.top}
        top.setdefault(token, e.logprob)  # OpenAI: the most likely tokens, and the chosen one
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries: list[TokenLogprob], text: TokenText, as_ids: bool) -> dict[str, list[dict[str, Any]]]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = text(token_id, as_ids)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries]}
