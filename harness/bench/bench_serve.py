"""``harness bench-serve``: the benchmark's workloads and arrivals against any OpenAI-compatible server.

``harness bench-serve --base-url URL [--model NAME] [flags] [overrides]`` is the benchmark's own
Hydra app with the target ``engine=http`` (harness.bench.http): the flags are that target's
settings (``--base-url`` is ``engine.base_url``, ``--kv-source`` is ``engine.kv_source``, ...) and
every other argument is an override of ``conf/config.yaml`` (``workload=``, ``arrival=``,
``+experiment=``, ``-m`` sweeps). The requests and their arrival times are built exactly as an
offline run builds them, each is streamed from the server, and the run is recorded, summarised
and reported by the same job code, so the tables have the same columns and the report the same
figures as an offline run. An experiment that sweeps engines measures the server's engine only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# flag -> the HTTP target's setting it sets
TARGET_FLAGS = {
    "base_url": "engine.base_url", "model": "engine.model", "tokenizer": "engine.tokenizer",
    "endpoint": "engine.endpoint", "prompt_format": "engine.prompt_format", "kv_source": "engine.kv_source",
    "kv_poll_interval": "engine.kv_poll_interval", "request_timeout": "engine.request_timeout",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness bench-serve",
        description="Run the benchmark's workloads and arrivals against an OpenAI-compatible server over HTTP, "
                    "with the offline harness's metrics, results and report. Extra arguments are Hydra overrides of "
                    "conf/config.yaml (workload=sharegpt_like arrival=poisson arrival.rate=4 +experiment=smoke name=...); "
                    "the same run is `python -m harness engine=http engine.base_url=URL ...`.")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", help="the served model name (default: the server's first model); a local model directory "
                                   "or preset name here is also used as the tokenizer")
    p.add_argument("--tokenizer", help="model directory whose tokenizer builds the prompts (default: the server's, "
                                       "when it is our server on this machine)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (or set OPENAI_API_KEY); never recorded")
    p.add_argument("--endpoint", choices=["completions", "chat"],
                   help="completions (default) sends token ids (exact prompt lengths); chat sends the decoded text as "
                        "one user message")
    p.add_argument("--out", type=Path, help="run directory to write, or a sweep's directory (default: Hydra's, "
                                            "outputs/NAME/TIMESTAMP or multirun/NAME/TIMESTAMP)")
    p.add_argument("--kv-source", choices=["auto", "kvbench", "metrics", "none"],
                   help="where KV data comes from: auto (default) = /kvbench/kv_log on our server, else /metrics")
    p.add_argument("--kv-poll-interval", type=float,
                   help="seconds between reads of the KV log (our server: every step is in it) or scrapes of /metrics "
                        "(default 0.02)")
    p.add_argument("--request-timeout", type=float, help="seconds a request may take (default: no limit)")
    p.add_argument("--no-report", action="store_true", help="write the tables only")
    p.add_argument("--prompt-format", choices=["auto", "text", "token-ids"],
                   help="how completions prompts are sent: token ids (exact lengths), or text (for servers that take "
                        "only strings; the lengths are then the server's, from usage); auto (default): token ids if the "
                        "server takes them")
    p.add_argument("--save-result", action="store_true",
                   help="also write each run as `vllm bench serve --save-result` does (vllm_result.json, vLLM's fields)")
    p.add_argument("--multirun", "-m", action="store_true",
                   help="run as a sweep (`harness -m`); a comma list (arrival.rate=1,2,4) or an experiment with "
                        "hydra.sweeper.params sweeps without it")
    return p


def to_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as overrides of the benchmark's config."""
    from harness.common.config import override_value

    out = ["engine=http"]
    for flag, key in TARGET_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={override_value(value)}")
    if args.out is not None:
        out += [f"hydra.run.dir={override_value(str(args.out))}", f"hydra.sweep.dir={override_value(str(args.out))}"]
    if args.no_report:
        out.append("report=false")
    if args.save_result:
        out.append("save_vllm_result=true")
    return out


def main(argv: list[str] | None = None) -> int:
    from harness.bench.app import run_app
    from harness.bench.http.target import API_KEY_ENV

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.api_key:
        os.environ[API_KEY_ENV] = args.api_key  # read by the target; the run's recorded config never holds it
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "engine"]
    if chosen:
        logging.getLogger(__name__).warning("the server's engine is fixed: %s is left out", " ".join(chosen))
        overrides = [o for o in overrides if o not in chosen]
    multirun = args.multirun or _sweeps(overrides)  # as `vllm bench serve` users expect: a list of rates is a sweep
    return run_app((["-m"] if multirun else []) + to_overrides(args) + overrides)


def _sweeps(overrides: list[str]) -> bool:
    """Whether an override sweeps (``arrival.rate=1,2,4``); a malformed one is left for Hydra to name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    sys.exit(main())
