"""Chat templates from the model directory, rendered as transformers renders them.

The template is ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named
templates of which ``default`` is used) or a ``chat_template.jinja`` file. It is rendered
with jinja2 in a sandbox with transformers' settings (trim_blocks, lstrip_blocks,
``raise_exception``, ``tojson``) and the tokenizer's special tokens, and the result is
tokenized without adding special tokens again (templates render BOS themselves).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from harness.serve.errors import bad_request
from harness.serve.protocol import ChatMessage


class TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class ChatTemplate:
    source: str | None
    special_tokens: dict[str, str | None]

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ChatTemplate":
        model_dir = Path(model_dir)
        config: dict[str, Any] = {}
        cfg_file = model_dir / "tokenizer_config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = model_dir / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text()
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(source, tokens)

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, template: str | None = None,
               kwargs: dict[str, Any] | None = None) -> str:
        source = template if template is not None else self.source
        if source is None:
            raise bad_request("this model has no chat template (tokenizer_config.json has no chat_template); "
                              "use /v1/completions, or pass one in the request's chat_template field", "messages")
        if not messages:
            raise bad_request("messages must hold at least one message", "messages")
        if add_generation_prompt and continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both be true", "continue_final_message")
        plain = [self._plain(m, i) for i, m in enumerate(messages)]
        context = {**self.special_tokens, **(kwargs or {}), "messages": plain, "add_generation_prompt": add_generation_prompt}
        try:
            text = _compile(source).render(**context)
        except TemplateRaised as e:
            raise bad_request(f"the chat template refused these messages: {e}", "messages") from e
        except Exception as e:  # noqa: BLE001 - a template that fails on these messages (jinja2 or sandbox errors)
            raise bad_request(f"the chat template failed: {type(e).__name__}: {e}",
                              "chat_template" if template is not None else "messages") from e
        if continue_final_message:
            final = plain[-1]["content"]
            cut = text.rfind(final)
            if not final or cut < 0:
                raise bad_request("continue_final_message: the final message is not in the rendered chat", "messages")
            text = text[: cut + len(final)]
        return text

    @staticmethod
    def _plain(message: ChatMessage, i: int) -> dict[str, Any]:
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}]: only text content parts are supported, got type {part.type!r}",
                                      "messages")
                texts.append(part.text)
            content = "\n".join(texts)
        plain: dict[str, Any] = {"role": message.role, "content": content if content is not None else ""}
        if message.name is not None:
            plain["name"] = message.name
        return plain
