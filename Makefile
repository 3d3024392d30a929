# Each target does all its own set-up on a fresh clone: a virtual environment in .venv with
# the exact versions of requirements.lock, torch pinned to 2.13.0 (a CPU build on our CI
# machines, taken from their disk; PyPI's CUDA build on a Linux GPU box).
VENV ?= .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= concurrency_sweep
TORCH := torch==2.13.0

# requirements.lock pins every package (a pip constraints file). `make lock` regenerates it:
# uv resolves the newest versions pyproject.toml allows, for every platform and Python it
# accepts, with torch at $(TORCH). torch's CUDA packages (nvidia-*, cuda-*) are left out: a
# CPU machine never installs them and a GPU box takes the ones its torch build names; triton
# stays pinned to the version torch's CUDA build requires, so the lock installs there too.
LOCK := requirements.lock
UV := uv==0.13.8
LOCK_VENV := .venv-lock

# `make test-latest` proves the newest versions pyproject.toml allows, without the lock, on
# the tests that exercise transformers (whose API moves under us): the hf engines and every
# engine through the runner.
LATEST_VENV := .venv-latest
LATEST_TESTS := tests/test_hf_baselines.py tests/test_every_engine_runs.py \
	tests/test_engines.py::test_transformers_baselines_match_reference tests/test_engines.py::test_hf_paged_samples_per_request

.PHONY: setup test run gpu-test lock test-latest mutation
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q -x

run: setup
	$(PY) -m harness +experiment=$(EXPERIMENT)

gpu-test: setup
	$(PY) -m pytest -q -m gpu

lock:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(UV)"
	echo "$(TORCH)" | $(LOCK_VENV)/bin/uv pip compile pyproject.toml - --extra dev --universal --upgrade \
		--no-config --annotation-style line --custom-compile-command "make lock" --quiet -o $(LOCK).tmp
	{ echo "# Constraints for make setup; torch's CUDA packages (nvidia-*, cuda-*) are left out (see the Makefile)."; \
	  grep -vE '^(nvidia|cuda)-' $(LOCK).tmp; } > $(LOCK)
	rm $(LOCK).tmp

test-latest:
	python3 -m venv --clear $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -e ".[dev]"
	$(LATEST_VENV)/bin/python -c "import transformers, torch; print('newest allowed: transformers', transformers.__version__, '/ torch', torch.__version__)"
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LATEST_TESTS)

# Mutation testing of the modules that define the figures and the KV memory ([tool.mutmut] in
# pyproject.toml; experiments/mutation/README.md). On demand only, never part of `test` or CI:
# a fresh run takes tens of minutes on 2 cores. Prints killed/total and the score per module.
MUTATION_JOBS ?= 2
mutation: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) > mutants.log 2>&1 || (tail -c 3000 mutants.log; exit 1)
	$(PY) experiments/mutation/score.py
