# tumorlens — two commands for a newcomer: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tumorlens-installed
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE := 1
export PYTHONUTF8 := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test lint train evaluate clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-nodeps.txt
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -r requirements-compiled.txt
	$(BIN)/pip install --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv/ and install everything (idempotent)

run: setup  ## the main job on embedded defaults
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/tumorlens serve

test: setup  ## the test suite (CPU)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check lib monai_app slicer_module tests bench

clean-venv:
	rm -rf $(VENV)
