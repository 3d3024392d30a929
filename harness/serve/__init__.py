"""``harness serve``: an engine behind an OpenAI-compatible HTTP server (FastAPI + uvicorn).

One concept per file: ``config`` (the typed config and its Hydra composition), ``protocol``
(OpenAI's request and response shapes), ``errors`` (OpenAI's error JSON), ``chat`` (chat
templates), ``engine_loop`` (the one thread that owns the engine), ``metrics`` (Prometheus),
``serving`` (requests in, tokens out: the OpenAI endpoints' logic) and ``app`` (the FastAPI
app: routes, auth, limits, lifespan).
"""
