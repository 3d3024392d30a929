# Each target does all its own set-up on a fresh clone: a virtual environment in .venv with
# torch pinned to 2.13.0 (a CPU build on our CI machines; PyPI's CUDA build on a Linux GPU box).
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= concurrency_sweep

.PHONY: setup test run gpu-test
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
