# xclay set-up and checks. On a new machine, `make demo` and `make test` are all you need:
# each creates .venv, installs what it needs, and runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH_VERSION ?= 2.13.0
UV_VERSION ?= 0.13.10
LOCK := requirements/dev-py311-linux-cpu.txt
# The test files spread over every core, each file on one worker (its fixtures made once).
PYTEST_ARGS ?= -n auto --dist loadfile

# Without a CUDA GPU take PyTorch's CPU build, not several GB of CUDA wheels.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# Where the CPU build lies on disk already (pip's find-links on these machines), no index.
ifeq ($(HAS_GPU),yes)
TORCH_INDEX ?=
else ifneq ($(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*),)
TORCH_INDEX ?=
else
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu
endif

.PHONY: demo test lint typecheck pytest docs core-collect lock clean

demo: $(VENV)/.installed
	$(BIN)/xclay demo

test: $(VENV)/.dev lint typecheck pytest docs core-collect

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# xclay compiled once first: where PYTHONDONTWRITEBYTECODE is set (these machines), each of
# the suite's hundreds of subprocesses would compile it again.
pytest: $(VENV)/.dev
	$(BIN)/python -m compileall -q xclay > /dev/null
	$(BIN)/pytest $(PYTEST_ARGS)

# A GPU image has the core and gpu dependencies only (no rasterio, pystac, geopandas,
# duckdb, distributed): the test suite must still collect there, skipping what needs more.
# This venv has the core dependencies at the locked versions, and pytest.
CORE_VENV ?= .venv-core
core-collect: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -p no:cacheprovider -m gpu -qq --collect-only -rs

$(CORE_VENV)/.installed: pyproject.toml $(LOCK) $(VENV)/.uv
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install -q --no-deps "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(BIN)/uv pip install -q --compile-bytecode --python $(CORE_VENV)/bin/python -c $(LOCK) -e . pytest
	touch $@

# The documentation site; notebooks run during the build; any warning fails it. The API
# stubs are regenerated each time, so a moved or renamed object leaves no stale page.
docs: $(VENV)/.dev
	rm -rf docs/generated
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch alone first, from the right index; its own requirements come with the next step.
$(VENV)/.torch: | $(BIN)/python
	$(PIP) install -q --no-deps "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	touch $@

# uv installs the locked packages: the same wheels, compiled as pip compiles them, in
# seconds where pip takes minutes.
$(VENV)/.uv: | $(BIN)/python
	$(PIP) install -q "uv==$(UV_VERSION)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

# Tests run against the locked versions (the lock excludes torch, installed above).
$(VENV)/.dev: pyproject.toml $(LOCK) $(VENV)/.torch $(VENV)/.uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@ $(VENV)/.installed

# Regenerate the pip lock (needs the registry; run after changing dependencies). torch is
# resolved as its CPU build, so the lock never lists CUDA packages.
TORCH_CPU_SOURCE := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
lock: $(VENV)/.uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 $(TORCH_CPU_SOURCE) \
	  --constraint <(echo "torch==$(TORCH_VERSION)") --no-emit-package torch \
	  --no-header -o $(LOCK)

clean:
	rm -rf $(VENV) $(CORE_VENV) xclay-demo .mypy_cache .pytest_cache .ruff_cache docs/_build docs/generated
