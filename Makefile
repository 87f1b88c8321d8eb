# Developer entry points. `make demo` and `make test` are all a new checkout needs (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STATE_DIR ?= .guardstream

.PHONY: setup test test-fast lint demo bench up down status

setup: $(STAMP)

# Reinstall only when the project's metadata changed: the stamp is newer than pyproject.toml otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The whole suite; it starts a real Kafka and Redis itself (processor/local).
test: setup
	$(BIN)/pytest -q tests

# The tests that need no Kafka or Redis.
test-fast: setup
	$(BIN)/pytest -q -m "not integration" tests

# Kubernetes manifests, validated offline against the schemas kubernetes-validate ships: all but the
# kustomization (not a Kubernetes object) and the custom resources of KEDA and the Prometheus Operator
# (tests/deploy checks the ScaledObject against KEDA's documented fields). 1.30: the oldest Kubernetes
# the manifests are written for.
K8S_VERSION := 1.30.0
K8S_MANIFESTS := $(filter-out %/kustomization.yaml %/worker-scaledobject.yaml %/servicemonitor.yaml,\
	$(wildcard deploy/kubernetes/*.yaml))

# What review checks: lint, formatting, and the one-way imports between packages (pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $(K8S_VERSION) $(K8S_MANIFESTS)

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" STATE_DIR="$(STATE_DIR)" bash scripts/demo.sh

# The CPU benchmarks behind README's figures; each prints a table and writes JSON under bench/results/.
# GPU (one lent machine, one call): `bash bench/gpu_session.sh OUT_DIR` (docs/gpu.md).
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
