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

test: setup
	$(BIN)/pytest -q tests

lint: setup
	$(BIN)/ruff check .

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" STATE_DIR="$(STATE_DIR)" bash scripts/demo.sh

# Runs bench scripts one after another: all of bench/*.py, or `make bench BENCH=bench/engine.py
# BENCH_ARGS="--size small"`. The repo root is on PYTHONPATH so scripts can import tests' helpers.
BENCH ?= $(wildcard bench/*.py)
BENCH_ARGS ?=
bench: setup
	@if [ -z "$(strip $(BENCH))" ]; then echo "no bench/*.py scripts yet"; fi
	@for script in $(BENCH); do echo "== $$script $(BENCH_ARGS)"; \
		PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(BIN)/python "$$script" $(BENCH_ARGS) || exit $$?; done

up: setup
	$(BIN)/guardstream local up --state-dir $(STATE_DIR)

down: setup
	$(BIN)/guardstream local down --state-dir $(STATE_DIR)

status: setup
	$(BIN)/guardstream local status --state-dir $(STATE_DIR)
