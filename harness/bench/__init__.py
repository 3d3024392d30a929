"""The benchmark: ``python -m harness [+experiment=NAME] [overrides]`` (harness.bench.app) and ``harness bench-serve``."""
