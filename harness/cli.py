"""``harness`` command line: subcommands, and Hydra overrides for the main job.

``harness make-model ...``, ``harness report ...``, ``harness serve ...`` and
``harness bench-serve ...`` are subcommands; anything else (``harness +experiment=smoke``)
is passed to the Hydra app, the same as ``python -m harness``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module whose main(argv) runs it
SUBCOMMANDS = {
    "make-model": "harness.cli",
    "report": "harness.report",
    "serve": "harness.serve",
    "bench-serve": "harness.bench_serve",
}


def make_model_main(argv: list[str]) -> int:
    from harness.make_model import DEFAULT_SHARD_BYTES, make_model
    from harness.presets import PRESETS

    parser = argparse.ArgumentParser(prog="harness make-model", description=(
        "Write a Hugging Face model directory with random weights of a real architecture's exact shape."))
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-size-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                        help="largest safetensors shard; a larger model is sharded with an index file")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to draw the random weights (a seed's weights differ between CPU and CUDA)")
    args = parser.parse_args(argv)
    out = make_model(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                     shard_bytes=int(args.shard_size_gb * 2**30), device=args.device)
    print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "make-model":
            return make_model_main(rest)
        return importlib.import_module(SUBCOMMANDS[command]).main(rest)
    from harness.app import run_app

    return run_app(argv)


if __name__ == "__main__":
    sys.exit(main())
