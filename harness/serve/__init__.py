"""``harness serve``: an engine behind an OpenAI-compatible HTTP server (FastAPI + uvicorn).

One concept per file: ``config`` (the typed config and its Hydra composition), ``protocol``
(OpenAI's request and response shapes), ``errors`` (OpenAI's error JSON), ``chat`` (chat
templates), ``logprobs`` (logprobs as OpenAI shows them), ``engine_loop`` (the one thread that
owns the engine), ``engine_process`` (that loop in a process of its own, seen from the server),
``engine_worker`` (the same, inside that process), ``messages`` (what crosses the pipes between
the two), ``pipe`` (writing to them without waiting on the reader), ``kv_feed`` (the engine's KV
log, for ``/kvbench/kv_log``), ``metrics`` (Prometheus), ``serving`` (what the OpenAI endpoints
share: checks, engine requests in, outputs back, server-sent events), ``completions``
(``/v1/completions``), ``chat_completions`` (``/v1/chat/completions``), ``app`` (the FastAPI
app: routes, auth, limits, lifespan), ``lifecycle`` (running it under uvicorn) and ``cli``
(``harness serve``'s command line).
"""
