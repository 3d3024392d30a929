"""``harness`` command line: subcommands, and Hydra overrides for the main job.

``harness make-model ...``, ``harness report ...``, ``harness serve ...`` and
``harness bench-serve ...`` are subcommands; anything else (``harness +experiment=smoke``)
is passed to the Hydra app, the same as ``python -m harness``.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> module whose main(argv) runs it
SUBCOMMANDS = {
    "make-model": "harness.models.make_model",
    "report": "harness.bench.report",
    "serve": "harness.serve.cli",
    "bench-serve": "harness.bench.bench_serve",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    from harness.bench.app import run_app

    return run_app(argv)


if __name__ == "__main__":
    sys.exit(main())
