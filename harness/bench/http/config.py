"""The typed config of an HTTP target: ``engine=http`` in the benchmark's ``engine/`` group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from harness.common.errors import UserError

ENDPOINTS = ("completions", "chat")
PROMPT_FORMATS = ("auto", "text", "token-ids")
KV_SOURCES = ("auto", "kvbench", "metrics", "none")


@dataclass
class HTTPConfig:
    """Any OpenAI-compatible server, measured over HTTP. Its engine is the server's: ours says which (so the
    run's ``engine.*`` columns are an offline run's); another server's is these settings."""

    name: str = "http"
    base_url: Optional[str] = None  # the server, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: Optional[str] = None  # the served model name (default: the server's first); a model directory or preset
    # name that the server calls otherwise is also taken as the tokenizer
    tokenizer: Optional[str] = None  # model directory whose tokenizer builds the prompts (default: the server's own,
    # when it is ours on this machine or serves a preset)
    endpoint: str = "completions"  # completions sends token ids (exact prompt lengths); chat the decoded text
    prompt_format: str = "auto"  # completions prompts: token-ids, text (lengths from the server's usage), or auto:
    # token ids if the server takes them
    kv_source: str = "auto"  # auto: /kvbench/kv_log on our server (the full breakdown), else /metrics (usage only)
    kv_poll_interval: float = 0.02  # seconds between reads of the KV log or scrapes of /metrics
    request_timeout: Optional[float] = None  # seconds one request may take (None: no limit)

    def __post_init__(self) -> None:
        problems = [
            (bool(self.base_url), "engine=http needs engine.base_url (the server, e.g. http://127.0.0.1:8000)"),
            (self.endpoint in ENDPOINTS, f"engine.endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}"),
            (self.prompt_format in PROMPT_FORMATS,
             f"engine.prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}"),
            (self.kv_source in KV_SOURCES, f"engine.kv_source must be one of {', '.join(KV_SOURCES)}, got {self.kv_source!r}"),
            (self.kv_poll_interval > 0, f"engine.kv_poll_interval must be > 0, got {self.kv_poll_interval}"),
            (self.request_timeout is None or self.request_timeout > 0,
             f"engine.request_timeout must be > 0 (or null), got {self.request_timeout}"),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message)
