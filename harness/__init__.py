"""kvbench's harness, in three parts over one shared layer.

- ``harness.bench``: the benchmark (the Hydra app, jobs, the runner, workloads, metrics, results, reports), driving
  our engines in process or any OpenAI-compatible server over HTTP, through one pipeline.
- ``harness.serve``: ``harness serve``, an engine behind an OpenAI-compatible HTTP server (FastAPI + uvicorn).
- ``harness.models``: model making (presets of real architectures, random weights, a trained tokenizer).
- ``harness.common``: what the benchmark and the server both need: config composition and its typed schema, model
  resolution, engine warm-up, user errors, machine facts.
"""
