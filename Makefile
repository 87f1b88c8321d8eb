# Developer entry points. `make demo` and `make test` are all a new checkout needs (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STATE_DIR ?= .guardstream

.PHONY: setup test lint demo bench up down status

setup: $(STAMP)

# Reinstall only when the project's metadata changed: the stamp is newer than pyproject.toml otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The suite twice: the modules processor/compiled.py compiles imported as source, then compiled (as
# `guardstream worker` runs them). Their build first, so that no test waits for it.
test: setup
	$(BIN)/python -m processor.compiled
	$(BIN)/pytest -q tests
	GUARDSTREAM_COMPILED=1 $(BIN)/pytest -q tests

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/python -m processor.compiled
	PATH="$(abspath $(BIN)):$$PATH" STATE_DIR="$(STATE_DIR)" bash scripts/demo.sh

# The CPU benchmarks behind README's figures; each prints a table and writes JSON under bench/results/.
# GPU (one lent machine, one call): `bash bench/gpu_session.sh OUT_DIR` (see README, "On a GPU").
BENCH_MODEL := $(STATE_DIR)/models/test-tiny
bench: setup
	PYTHONPATH="$(CURDIR)" $(BIN)/python bench/engine.py --size small --threads 1
	@test -f $(BENCH_MODEL)/config.json || $(BIN)/guardstream make-test-model $(BENCH_MODEL) --size tiny
	PYTHONPATH="$(CURDIR)" $(BIN)/python bench/pipeline.py --model $(BENCH_MODEL) --device cpu

up: setup
	$(BIN)/guardstream local up --state-dir $(STATE_DIR)

down: setup
	$(BIN)/guardstream local down --state-dir $(STATE_DIR)

status: setup
	$(BIN)/guardstream local status --state-dir $(STATE_DIR)
