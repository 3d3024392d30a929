"""What a server is and serves: its models, and from our server its engine, model and KV endpoints."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.http.config import HTTPConfig
from harness.common.errors import UserError

log = logging.getLogger(__name__)

# What our server's /kvbench replies hold; a server that answers these routes with anything else is not ours.
INFO_KEYS = ("engine", "kv_capacity_tokens", "max_model_len")
LOG_KEYS = ("fields", "samples", "allocations", "next", "missed", "breakdown", "now")


@dataclass
class ServerView:
    base_url: str  # without /v1
    model: str  # the served name requests ask for
    max_model_len: int | None
    info: dict[str, Any] | None  # /kvbench/info from our server, None from others
    headers: dict[str, str] = field(default_factory=dict)


def root_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def discover(client, base_url: str, model: str | None, headers: dict[str, str]) -> ServerView:
    """The server's model card (and from ours, /kvbench/info); a user error naming the problem if it cannot be used."""
    from harness.models.presets import PRESETS

    root = root_url(base_url)
    try:
        r = await client.get(f"{root}/v1/models", headers=headers)
    except Exception as e:  # noqa: BLE001 - any transport failure is the user's URL
        raise UserError(f"engine.base_url: cannot reach {root}/v1/models ({type(e).__name__}: {e})") from e
    if r.status_code == 401:
        raise UserError(f"{root} wants an API key (--api-key or OPENAI_API_KEY)")
    if r.status_code != 200:
        raise UserError(f"{root}/v1/models answered {r.status_code}: {r.text[:200]}")
    cards = r.json().get("data", [])
    names = [c.get("id") for c in cards]
    if not names:
        raise UserError(f"{root} serves no model")
    if model is None or model in names:
        served = model or names[0]
    elif Path(model).is_dir() or model in PRESETS:  # a tokenizer source, named differently by the server
        served = names[0]
        log.warning("engine.model %s is not a name %s serves (%s); sending %s", model, root, ", ".join(names), served)
    else:
        raise UserError(f"engine.model: {root} serves {', '.join(names)}, not {model!r}")
    card = next((c for c in cards if c.get("id") == served), {})
    info = await json_with(client, f"{root}/kvbench/info", headers, INFO_KEYS)
    if info is None:
        log.info("%s has no kvbench endpoints (or they answer something else): KV memory from /metrics", root)
    return ServerView(root, served, card.get("max_model_len") or (info or {}).get("max_model_len"), info, headers)


async def json_with(client, url: str, headers: dict[str, str], keys: tuple[str, ...], **params: Any) -> dict | None:
    """The JSON object at ``url`` if it answers 200 with every one of ``keys``, else None (never an exception:
    a server's stray answer must not cost a run its results)."""
    try:
        r = await client.get(url, headers=headers, params=params or None)
        body = r.json() if r.status_code == 200 else None
    except Exception as e:  # noqa: BLE001 - a transport failure or a body that is not JSON: the same as absent
        log.debug("%s: %s", url, e)
        return None
    return body if isinstance(body, dict) and all(k in body for k in keys) else None


def tokenizer_dir(cfg: HTTPConfig, view: ServerView, model_spec, model_overridden: bool) -> Path:
    """Where the prompts' tokenizer comes from: engine.tokenizer, the server's own directory or preset,
    engine.model, or model=..."""
    from harness.common.engine import resolve_model_dir
    from harness.common.schema import ModelSpec
    from harness.models.presets import PRESETS

    if cfg.tokenizer:
        if not Path(cfg.tokenizer).is_dir():
            raise UserError(f"engine.tokenizer: {cfg.tokenizer!r} is not a directory")
        return Path(cfg.tokenizer)
    info = view.info or {}
    if info.get("model_dir") and Path(info["model_dir"]).is_dir():
        return Path(info["model_dir"])
    if info.get("model_preset") in PRESETS:  # our server on another machine, serving a preset: the same tokenizer
        return resolve_model_dir(ModelSpec(preset=info["model_preset"]))
    if cfg.model and Path(cfg.model).is_dir():
        return Path(cfg.model)
    if cfg.model in PRESETS:
        return resolve_model_dir(ModelSpec(preset=cfg.model))
    if model_overridden:
        return resolve_model_dir(model_spec)
    raise UserError("which tokenizer builds the prompts? pass --tokenizer DIR (engine.tokenizer: the served model's "
                    "directory), --model DIR, or model=PRESET")


def engine_of(view: ServerView, cfg: HTTPConfig) -> tuple[Any, str]:
    """The server's engine config and label: ours tells (so the engine.* columns match an offline run); of another
    server, only the target's settings are known."""
    from engines.config import ENGINE_CONFIGS

    info = view.info or {}
    name, engine_cfg = info.get("engine"), info.get("engine_config")
    if name in ENGINE_CONFIGS and isinstance(engine_cfg, dict):
        try:
            return ENGINE_CONFIGS[name](**engine_cfg), f"{info.get('engine_label') or name}@http"
        except TypeError:
            pass
    return cfg, f"http:{view.model}"


async def takes_token_ids(http, view: ServerView, token_ids: list[int]) -> bool:
    """Whether /v1/completions takes a prompt of token ids: one request, answered 200 or not."""
    body = {"model": view.model, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0}
    try:
        r = await http.post(f"{view.base_url}/v1/completions", json=body, headers=view.headers)
    except Exception as e:  # noqa: BLE001 - the run's own requests will say what is wrong with the server
        log.debug("prompt-format probe: %s", e)
        return True
    if r.status_code != 200:
        log.info("%s does not take token-id prompts (HTTP %d): sending text, lengths from the server's usage",
                 view.base_url, r.status_code)
    return r.status_code == 200


async def open_connections(session, view: ServerView, count: int) -> None:
    """Open ``count`` keep-alive connections to the server (``count`` requests for /health at once), so that a closed
    loop's first requests find theirs open, as the offline runner's find the engine: otherwise the first wave's TTFT
    holds ``count`` TCP handshakes and the server accepting them one after another (about 90 ms for 64 streams)."""
    url = view.base_url + "/health"

    async def one() -> None:
        async with session.get(url, headers=view.headers) as r:
            await r.read()

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        log.warning("opening %d connections before the run: %d failed (%s)", count, len(failed), failed[0])
