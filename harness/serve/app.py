"""The FastAPI app: OpenAI's routes over one engine loop, with auth, body limits and OpenAI-shaped errors.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /tokenize``,
``POST /detokenize`` (these need ``Authorization: Bearer KEY`` when an API key is set), ``GET /health``
(503 once the engine loop has died), ``GET /metrics`` (Prometheus), ``GET /version``, ``GET /openapi.json``
(every route, with the request and response bodies' JSON schemas) and ``GET /docs`` (FastAPI's Swagger UI),
and three of our own that ``harness bench-serve`` reads: ``GET /kvbench/info`` (engine, config, KV capacity,
hardware), ``GET /kvbench/kv_stats`` (the engine's KV counters now) and ``GET /kvbench/kv_log``
(its KV log after every step, harness.serve.kv_feed).

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a status that fits:
400 for a bad body (malformed JSON, a field of the wrong type, a value out of range, a prompt
that cannot fit), 401 for a missing or wrong key, 404 for an unknown model or route, 413 for
a body over ``server.max_body_bytes``, 429 (with Retry-After) when the waiting queue is
full, 503 (with Retry-After) when the engine is not running. A 500 means a bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

import pydantic
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines.base import Engine
from engines.detokenizer import load_tokenizer
from engines.request import RequestError
from harness.common.engine import freeze_heap
from harness.serve.chat import ChatTemplate
from harness.serve.chat_completions import create_chat_completion
from harness.serve.completions import create_completion
from harness.serve.config import ServerConfig
from harness.serve.engine_loop import EngineLoop
from harness.serve.engine_process import EngineProcess
from harness.serve.errors import APIError, bad_request, error_body
from harness.serve.metrics import CONTENT_TYPE, ServerMetrics
from harness.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from harness.serve.serving import ClientGone, ModelInfo, Serving

log = logging.getLogger(__name__)

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|set|tuple|union|nullable|literal|function-\w+)\[.*)$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNION_HINTS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "stop must be a string or a list of strings",
    "content": "content must be a string or a list of content parts",
    "tool_choice": "tool_choice must be a string or an object",
}
# The JSON bodies of the routes that parse their own (so FastAPI cannot see them): requests, then the 200's body.
BODIES: dict[tuple[str, str], tuple[tuple[type[pydantic.BaseModel], ...], type[pydantic.BaseModel]]] = {
    ("/v1/completions", "post"): ((CompletionRequest,), CompletionResponse),
    ("/v1/chat/completions", "post"): ((ChatCompletionRequest,), ChatCompletionResponse),
    ("/tokenize", "post"): ((TokenizeCompletionRequest, TokenizeChatRequest), TokenizeResponse),
    ("/detokenize", "post"): ((DetokenizeRequest,), DetokenizeResponse),
    ("/v1/models", "get"): ((), ModelList),
    ("/v1/models/{name}", "get"): ((), ModelCard),
}


@dataclasses.dataclass
class ServerState:
    engine: Engine | None  # None when the engine runs in its own process
    loop: EngineLoop | EngineProcess
    serving: Serving
    metrics: ServerMetrics
    cfg: ServerConfig
    info: dict[str, Any]


def validation_error(e: pydantic.ValidationError) -> APIError:
    """A 400 naming the first field at fault and what it should be."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(x) for x in first.get("loc", ())]
    field_path = [x for x in loc if not _TYPE_TAG.match(x)]
    # union members show up as extra path parts: report the field, with the shapes it accepts
    param = ".".join(field_path) or None
    leaf = next((x for x in reversed(field_path) if not x.isdigit()), None)
    same_field = [err for err in errors if [str(x) for x in err.get("loc", ())][:1] == loc[:1]]
    if leaf in UNION_HINTS and len(same_field) > 1:
        # the union field itself, not an item of one of its members (``prompt``, not ``prompt.1``)
        param = ".".join(field_path[:len(field_path) - field_path[::-1].index(leaf)])
        return bad_request(UNION_HINTS[leaf] + (f" ({param})" if param != leaf else ""), param)
    if first.get("type") == "missing":
        return bad_request(f"{param} is required", param)
    if first.get("type") == "model_type" and not param:
        return bad_request("the body must be a JSON object")
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return bad_request(f"{param}: {first['msg']} (got {shown})", param)


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request("Content-Length is not a number") from None
        if size > limit:
            raise APIError(413, f"the request body has {size} bytes; the limit is {limit} (server.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes (server.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(loop: EngineLoop | EngineProcess, *, model_dir: str | Path, served_names: list[str], cfg: ServerConfig,
               engine_label: str | None = None, engine_config: Any = None, extra_info: dict[str, Any] | None = None) -> FastAPI:
    """An app serving the engine behind ``loop`` (built and warm: an ``EngineLoop`` over an engine of this
    process, or a started ``EngineProcess``); the loop starts with the app and stops with it."""
    model_dir = Path(model_dir)
    engine_info = loop.info
    metrics = ServerMetrics(served_names[0], engine_info.name, engine_info.block_size)
    info = ModelInfo(names=served_names, root=str(model_dir), max_model_len=engine_info.max_model_len,
                     vocab_size=engine_info.vocab_size, engine=engine_info.name, eos_token_ids=engine_info.eos_token_ids)
    serving = Serving(loop, load_tokenizer(model_dir), ChatTemplate.from_model_dir(model_dir), info, cfg, metrics)
    loop.on_outputs = serving.deliver
    loop.observer = metrics
    loop.max_queue = cfg.max_queue
    metrics.attach(loop)
    server_info = {
        "engine": engine_info.name, "engine_label": engine_label or engine_info.name,
        "engine_config": dataclasses.asdict(engine_config) if dataclasses.is_dataclass(engine_config) else engine_config,
        "model": served_names[0], "model_dir": str(model_dir), "max_model_len": engine_info.max_model_len,
        "vocab_size": engine_info.vocab_size, "kv_capacity_tokens": engine_info.capacity, "block_size": engine_info.block_size,
        "device": engine_info.device, "engine_process": isinstance(loop, EngineProcess), **(extra_info or {}),
    }
    state = ServerState(getattr(loop, "engine", None), loop, serving, metrics, cfg, server_info)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.aio_loop = asyncio.get_running_loop()
        await serving.aio_loop.run_in_executor(None, loop.start)  # an engine process may still be starting
        if isinstance(loop, EngineProcess):
            loop.attach(serving.aio_loop)  # its messages are read on this event loop
        log.info("engine loop started: %s serving %s on %s%s", engine_info.name, served_names[0], server_info["device"],
                 f" (engine process {loop.pid})" if isinstance(loop, EngineProcess) else "")
        # the server's start-up heap (its modules, the tokenizer) out of the collector's scans: a full collection of
        # it stalled every stream for 70-150 ms, once in a while
        freeze_heap()
        try:
            yield
        finally:
            log.info("stopping the engine loop (aborting what is still running)")
            await asyncio.get_running_loop().run_in_executor(None, loop.stop, cfg.shutdown_timeout_s)
            log.info("engine loop stopped")

    app = FastAPI(title="kvbench OpenAI-compatible server", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.kvbench = state
    app.openapi = lambda: app.openapi_schema or _openapi(app, secured=cfg.api_key is not None)
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestError)
    async def _request_error(request: HTTPRequest, e: RequestError) -> JSONResponse:
        return bad_request(str(e)).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: HTTPRequest, e: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return bad_request(str(e.errors()[0].get("msg", e))).response()

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    def authorize(request: HTTPRequest) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'" if not header
                           else "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def request_id(request: HTTPRequest) -> str | None:
        value = request.headers.get("x-request-id")
        if value is None:
            return None
        if not REQUEST_ID.match(value):
            raise bad_request("X-Request-Id must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
        return value

    async def parse(request: HTTPRequest, model: type[pydantic.BaseModel] | Callable[[bytes], Any]) -> Any:
        """The body as ``model``, or as the model that ``model(raw)`` picks for it."""
        raw = await read_body(request, cfg.max_body_bytes)
        if not raw.strip():
            raise bad_request("the request body is empty; send a JSON object")
        if not isinstance(model, type):
            model = model(raw)
        try:
            return model.model_validate_json(raw)
        except pydantic.ValidationError as e:
            raise validation_error(e) from None

    def answer(result: Any, rid: str | None) -> Any:
        if isinstance(result, Response):
            return result
        headers = {"X-Request-Id": result.id}
        return JSONResponse(result.model_dump(), headers=headers)

    async def generate(request: HTTPRequest, model: type[pydantic.BaseModel], handler) -> Any:
        arrival = time.perf_counter()
        try:
            authorize(request)
            rid = request_id(request)
            body = await parse(request, model)
            return answer(await handler(serving, body, request, arrival, rid), rid)
        except (APIError, ClientGone):
            raise
        except RequestError as e:
            return bad_request(str(e)).response()
        except Exception as e:  # noqa: BLE001 - a bug: answer 500 here, so the connection survives it
            log.exception("internal error on %s", request.url.path)
            return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await generate(request, CompletionRequest, create_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await generate(request, ChatCompletionRequest, create_chat_completion)

    async def utility(request: HTTPRequest, model: Any, handler: Callable[[Any], pydantic.BaseModel]) -> JSONResponse:
        authorize(request)
        return JSONResponse(handler(await parse(request, model)).model_dump(exclude_none=True))

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest) -> Any:
        return await utility(request, _tokenize_body, serving.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest) -> Any:
        return await utility(request, DetokenizeRequest, serving.detokenize)

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> Any:
        authorize(request)
        return JSONResponse(serving.models().model_dump())

    @app.get("/v1/models/{name:path}")
    async def model_card(request: HTTPRequest, name: str) -> Any:
        authorize(request)
        card = next((c for c in serving.models().data if c.id == name), None)
        if card is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(card.model_dump())

    @app.get("/health")
    async def health() -> Response:
        if loop.alive:
            return Response(status_code=200)
        return APIError(503, loop.error or "the engine loop is not running",
                        headers={"Retry-After": str(cfg.retry_after_s)}).response()

    @app.get("/version")
    async def version() -> Any:
        return {"version": _version()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/kvbench/info")
    async def kvbench_info(request: HTTPRequest) -> Any:
        authorize(request)
        return {**server_info, "alive": loop.alive, "max_batch_size": loop.max_batch_size, "num_steps": loop.num_steps,
                "engine_pid": getattr(loop, "pid", None) or os.getpid(), "api_pid": os.getpid(),
                "loop_seconds": dict(loop.loop_seconds)}

    @app.get("/kvbench/kv_stats")
    async def kvbench_kv_stats(request: HTTPRequest) -> Any:
        authorize(request)
        fields = dataclasses.asdict(loop.snapshot)
        fields["num_waiting"] = loop.num_waiting()
        return fields

    @app.get("/kvbench/kv_log")
    async def kvbench_kv_log(request: HTTPRequest, samples: int = 0, allocations: int = 0, times: int = 0) -> Any:
        """The engine's KV log after the given cursors (harness.serve.kv_feed), for bench-serve's KV breakdown."""
        authorize(request)
        return loop.kv_feed.since(samples, allocations, times)

    return app


class CountRequests:
    """Counts every HTTP answer by route template and status (``kvbench:http_requests``). Plain ASGI, so streamed
    answers and client disconnects pass through untouched; a route no one matched counts as ``unmatched``."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the server answers when the app raises before it starts a response

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.http_request(getattr(scope.get("route"), "path", "unmatched"), status)


def _tokenize_body(raw: bytes) -> type[pydantic.BaseModel]:
    """``/tokenize`` takes a prompt or messages (vLLM's two request shapes): messages when the body has them."""
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError):  # malformed or nested too deep for Python's parser: pydantic's says so
        return TokenizeCompletionRequest
    return TokenizeChatRequest if isinstance(fields, dict) and "messages" in fields else TokenizeCompletionRequest


def _openapi(app: FastAPI, secured: bool) -> dict[str, Any]:
    """FastAPI's document, completed with the bodies of the routes that parse their own (``BODIES``), so that a
    client generator or a schema-driven fuzzer sees every field; and the bearer scheme when a key is set."""
    doc = get_openapi(title=app.title, version=_version(), routes=app.routes,
                      description="OpenAI's completions and chat completions, vLLM's extras, and kvbench's own.")
    models = sorted({m for requests, response in BODIES.values() for m in (*requests, response)}, key=lambda m: m.__name__)
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    for (path, method), (requests, response) in BODIES.items():
        operation = doc["paths"][path][method]
        if requests:
            schemas = [refs[(m, "validation")] for m in requests]
            schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        operation["responses"]["200"]["content"] = {"application/json": {"schema": refs[(response, "validation")]}}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvbench")
    except PackageNotFoundError:
        return "unknown"
