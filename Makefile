# Each target does all its own set-up on a fresh clone: a virtual environment in .venv with
# torch pinned to 2.13.0 (a CPU build on our CI machines; PyPI's CUDA build on a Linux GPU box).
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= concurrency_sweep

.PHONY: setup test run gpu-test mutation
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q -x

run: setup
	$(PY) -m harness +experiment=$(EXPERIMENT)

gpu-test: setup
	$(PY) -m pytest -q -m gpu

# Mutation testing of the modules that define the figures and the KV memory ([tool.mutmut] in
# pyproject.toml; experiments/mutation/README.md). On demand only, never part of `test` or CI:
# a fresh run takes tens of minutes on 2 cores. Prints killed/total and the score per module.
MUTATION_JOBS ?= 2
mutation: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) > mutants.log 2>&1 || (tail -c 3000 mutants.log; exit 1)
	$(PY) experiments/mutation/score.py
