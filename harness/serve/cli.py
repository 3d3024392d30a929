"""``harness serve``: an engine behind an OpenAI-compatible HTTP server.

Two ways to say what to serve, which mix:

- Hydra overrides of ``conf/serve.yaml`` (the benchmark's ``model/`` and ``engine/`` groups plus
  ``server.*``): ``harness serve model=tiny-qwen3 engine=paged server.host=127.0.0.1 server.port=8000``
- vLLM-style flags: ``harness serve --model DIR --port 8000 --max-model-len 2048
  --gpu-memory-utilization 0.9 --served-model-name NAME --api-key KEY`` (``--model`` takes a
  model directory or a preset name; engine knobs such as ``--block-size`` or ``--max-num-seqs``
  set the engine's field of that name).

The model is loaded and the engine warmed up before the port opens; the KV capacity it sized
is logged. SIGTERM (or Ctrl-C) stops accepting connections, gives in-flight requests
``server.shutdown_timeout_s`` to finish, aborts the rest, and exits with status 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("harness.serve.cli")

EXIT_USER_ERROR = 2

# flag -> (config key, how its value is written)
SERVER_FLAGS = {
    "host": "server.host", "port": "server.port", "api_key": "server.api_key", "max_queue": "server.max_queue",
    "max_body_bytes": "server.max_body_bytes", "max_n": "server.max_n", "shutdown_timeout": "server.shutdown_timeout_s",
    "uvicorn_log_level": "server.log_level", "api_server_count": "server.api_server_count",
}
ENGINE_FLAGS = ("max_model_len", "gpu_memory_utilization", "block_size", "max_num_seqs", "max_num_batched_tokens",
                "swap_space", "dtype", "kv_budget_gb", "num_kv_slots", "preemption_mode", "device")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness serve",
        description="Serve an engine behind an OpenAI-compatible HTTP API (vLLM-style flags and/or Hydra overrides "
                    "of conf/serve.yaml, e.g. engine=contiguous engine.max_num_seqs=64 server.port=8001).",
        epilog="Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.")
    p.add_argument("--model", help="a model directory (Hugging Face layout) or a preset name (harness/models/presets.py); "
                                   "default: model=auto (tiny-qwen3 on a CPU, qwen3-0.6b on a GPU)")
    p.add_argument("--engine", help="engine config from conf/engine/ (paged, contiguous, contiguous_pow2, hf, ...); default paged")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--served-model-name", nargs="+", help="the name(s) clients use in the model field")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or set KVBENCH_API_KEY / VLLM_API_KEY)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens")
    p.add_argument("--gpu-memory-utilization", type=float, help="fraction of the GPU for weights, activations and KV cache")
    p.add_argument("--block-size", type=int, help="paged engine: tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget of one engine step")
    p.add_argument("--swap-space", type=float, help="GiB of CPU memory for swapped-out sequences")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--kv-budget-gb", type=float, help="KV cache budget in GB instead of gpu_memory_utilization")
    p.add_argument("--num-kv-slots", type=int, help="an exact KV capacity in token slots")
    p.add_argument("--preemption-mode", choices=["recompute", "swap"])
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    p.add_argument("--seed", type=int, help="seed for requests without their own")
    p.add_argument("--max-queue", type=int, help="requests allowed to wait for the engine before 429 (default 1024)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 16 MiB)")
    p.add_argument("--max-n", type=int, help="most samples per request (default 64)")
    p.add_argument("--shutdown-timeout", type=float, help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    p.add_argument("--api-server-count", type=int,
                   help="API processes behind the port, sharing one engine process (default 1)")
    p.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--tensor-parallel-size", "-tp", type=int,
                   help="GPUs the model is split over (engine.tensor_parallel_size; our engines only)")
    p.add_argument("--disable-log-requests", action="store_true", help="accepted for vLLM compatibility (requests are not logged)")
    return p


def to_overrides(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """Flags as Hydra overrides, and the model argument as given (the default served name)."""
    from harness.common.config import override_value
    from harness.common.errors import UserError
    from harness.models.presets import PRESETS

    out: list[str] = []
    if args.engine:
        out.append(f"engine={args.engine}")
    if args.tensor_parallel_size is not None:
        if args.engine in ("hf", "hf_paged"):
            raise UserError(f"--tensor-parallel-size: engine {args.engine} runs on one device (ours split a model: "
                            "contiguous, paged)")
        out.append(f"engine.tensor_parallel_size={args.tensor_parallel_size}")
    model_arg = args.model
    if model_arg is not None:
        if Path(model_arg).is_dir():
            out.append(f"model.path={override_value(str(Path(model_arg).resolve()))}")
        elif model_arg in PRESETS:
            out.append(f"model.preset={model_arg}")
        else:
            raise UserError(f"--model: {model_arg!r} is neither a model directory nor a preset "
                            f"(presets: {', '.join(PRESETS)})")
    for flag, key in SERVER_FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            out.append(f"{key}={override_value(v)}")
    if args.served_model_name:
        out.append("server.served_model_name=[" + ",".join(override_value(n) for n in args.served_model_name) + "]")
    for flag in ENGINE_FLAGS:
        v = getattr(args, flag)
        if v is not None:
            out.append(f"engine.{flag}={override_value(v)}")
    if args.enable_prefix_caching is not None:
        out.append(f"engine.enable_prefix_caching={override_value(args.enable_prefix_caching)}")
    if args.enforce_eager:
        out.append("engine.enforce_eager=true")
    if args.seed is not None:
        out += [f"seed={args.seed}", f"engine.seed={args.seed}"]
    return out, model_arg


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Flags (``--x``, ``--x value``) for argparse, and Hydra overrides (``key=value``, ``+key=value``)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.served_model_name:  # nargs="+" swallows overrides written after the names
        rest += [n for n in args.served_model_name if "=" in n]
        args.served_model_name = [n for n in args.served_model_name if "=" not in n] or None
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def load(argv: list[str]):
    """Parse ``argv``; returns the resolved config and the served names."""
    from harness.serve.config import compose_serve_config, resolve

    args, overrides = split_argv(argv)
    flag_overrides, model_arg = to_overrides(args)
    cfg = compose_serve_config(flag_overrides + overrides)
    resolved = resolve(cfg)
    if args.api_key is None and resolved.server.api_key is None:
        env_key = os.environ.get("KVBENCH_API_KEY") or os.environ.get("VLLM_API_KEY")
        if env_key:
            resolved.server.api_key = env_key
    names = list(resolved.server.served_model_name)
    if not names:
        if model_arg is not None:
            names = [model_arg]
        elif resolved.model.path is not None:
            names = [resolved.model.path]
        else:
            names = [resolved.model.preset]
    return resolved, names


def build_engine(resolved):
    """The engine, loaded and warm, and its model directory."""
    from engines import create_engine
    from engines.detokenizer import load_tokenizer
    from harness.common.engine import freeze_heap, regular_token_ids, resolve_model_dir, warm_up

    model_dir = resolve_model_dir(resolved.model)
    t0 = time.perf_counter()
    engine = create_engine(model_dir, resolved.engine)
    if resolved.server.warmup:
        warm_up(engine, regular_token_ids(load_tokenizer(model_dir), engine.model_config.vocab_size), 1)
    freeze_heap()  # the server's process holds this one engine for its life
    stats = engine.kv_stats()
    slot_bytes = getattr(engine, "slot_bytes", None)
    gpus = getattr(resolved.engine, "tensor_parallel_size", 1)
    size = f" ({stats.capacity * slot_bytes / 2**30:.2f} GiB" if slot_bytes else ""
    if size:  # a split model holds its KV heads of every token on each of its GPUs
        size += f" on each of {gpus} GPUs)" if gpus > 1 else ")"
    block = getattr(getattr(engine, "kv", None), "block_size", None)
    blocks = f", {stats.capacity // block} blocks of {block}" if block and resolved.engine.name == "paged" else ""
    log.info("engine %s (%s) on %s ready in %.1f s: KV capacity %d token slots%s%s; max_model_len %d, "
             "so at least %d full-length sequences fit at once", resolved.engine_label, resolved.engine.name,
             getattr(engine, "device", "cpu"), time.perf_counter() - t0, stats.capacity, size, blocks,
             engine.max_model_len, stats.capacity // max(engine.max_model_len, 1))
    return engine, model_dir


def open_engine(resolved) -> tuple[Any, dict[str, Any]]:
    """The engine, loaded and warm, and what the server reports about it (runs where the engine will run)."""
    import torch

    from harness.common.engine import compute_dtype
    from harness.common.system_info import hardware, hardware_label, model_shape, versions

    engine, model_dir = build_engine(resolved)
    device = getattr(engine, "device", torch.device("cpu"))
    hw = hardware(device if isinstance(device, torch.device) else torch.device(str(device)))
    return engine, {"model_dir": str(model_dir), "hardware": hw, "hardware_label": hardware_label(hw),
                    "compute_dtype": compute_dtype(engine),
                    "model_shape": model_shape(engine.model_config), "versions": versions(),
                    "model_preset": resolved.model.preset if resolved.model.path is None else None}


def start_engine(resolved):
    """The engine loop (in its own process unless ``server.engine_process=false``), started, with the model
    directory and the facts the server reports. Raises EngineStartError when the engine cannot be built."""
    from harness.serve.engine_loop import EngineLoop
    from harness.serve.engine_process import EngineProcess

    if resolved.server.engine_process:
        loop = EngineProcess(functools.partial(open_engine, resolved),
                             startup_timeout_s=resolved.server.engine_start_timeout_s)
        loop.start()
        facts = dict(loop.extra)
    else:
        engine, facts = open_engine(resolved)
        loop = EngineLoop(engine)
    return loop, Path(facts.pop("model_dir")), facts


def make_app(resolved, names, loop, model_dir, facts):
    from harness.serve.app import create_app

    return create_app(loop, model_dir=model_dir, served_names=names, cfg=resolved.server,
                      engine_label=resolved.engine_label, engine_config=resolved.engine,
                      extra_info={**facts, "config": resolved.config})


def app_over(resolved, names, loop, facts: dict[str, Any]):
    """The app of one of several API processes, over its link to the shared engine process."""
    facts = dict(facts)
    return make_app(resolved, names, loop, Path(facts.pop("model_dir")), facts)


def run_uvicorn(app, server_cfg, sockets=None, until: int | None = None) -> int:
    """Serve ``app`` until a signal (on ``sockets`` if given, else on the configured host and port), or until the
    ``until`` sentinel is ready (an API process whose launcher is gone); an exit status."""
    from harness.serve.api_servers import watch
    from harness.serve.lifecycle import make_server

    server = make_server(app, server_cfg.host, server_cfg.port, drain_s=server_cfg.shutdown_timeout_s,
                         log_level=server_cfg.log_level, access_log=server_cfg.access_log)
    if until is not None:
        watch(until, server)
    received: list[int] = []

    def note(sig, frame) -> None:  # uvicorn re-raises the signal it handled once it has shut down
        received.append(sig)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        return e.code if isinstance(e.code, int) else 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if not server.started:
        return 1
    log.info("shut down cleanly%s", f" on signal {signal.Signals(received[0]).name}" if received else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    from harness.common.errors import USER_ERRORS, describe_error

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from harness.serve.engine_process import EngineStartError

    try:
        resolved, names = load(argv)
        if resolved.server.api_server_count > 1:
            from harness.serve.api_servers import serve_shared

            return serve_shared(functools.partial(open_engine, resolved), functools.partial(app_over, resolved, names),
                                resolved.server)
        loop, model_dir, facts = start_engine(resolved)
    except USER_ERRORS as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as e:  # an engine config the engine refuses
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except EngineStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR if e.user_error else 1
    app = make_app(resolved, names, loop, model_dir, facts)
    log.info("serving %s at http://%s:%d/v1 (engine %s)%s", ", ".join(names), resolved.server.host, resolved.server.port,
             resolved.engine_label, "; API key required" if resolved.server.api_key else "")
    return run_uvicorn(app, resolved.server)


if __name__ == "__main__":
    sys.exit(main())
