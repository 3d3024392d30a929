"""``python -m harness``: the same command line as the ``harness`` script."""

import sys

from harness.cli import main

if __name__ == "__main__":  # not when a spawned engine process imports this module
    sys.exit(main())
