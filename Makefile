# Two commands a newcomer needs: `make demo` and `make test`.  Both set up .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast test-slow cluster-test lint bench up down status clean infra-lock

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=25"
	# torch first and alone, pinned: the CPU wheel here; nothing may pull a CUDA build as a side effect
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,eval]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prouigan demo

# the default suite: every tier but the slow ones and the cluster, about 20 minutes on 2 cores
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not inductor and not cluster" $(PYTEST_ARGS)

# pure unit tests: nothing started (no stack, no Ray, no MLflow server, no end-to-end command), under 2 minutes on 2 cores
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not stack and not cli and not slow and not inductor and not cluster" $(PYTEST_ARGS)

# a real 2-node Ray cluster on 127.0.0.1: a training job through the Jobs API, then a node stopped mid-run
cluster-test: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster $(PYTEST_ARGS)

# the tests of a minute or more each (whole searches, retraining, kills mid-training, Inductor compiles)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "(slow or inductor) and not cluster" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check prouigan platform pipelines tests benchmarks infra

bench: $(STAMP)
	$(BIN)/python benchmarks/model.py

up: $(STAMP)
	$(BIN)/prouigan platform up
down: $(STAMP)
	$(BIN)/prouigan platform down
status: $(STAMP)
	$(BIN)/prouigan platform status

# The image's requirements, every one pinned with its sha256 (pip install --require-hashes in infra/docker/Dockerfile):
# resolved from PyPI for Linux x86-64, Python 3.11, by uv in a throwaway venv (needs PyPI; never part of the project).
UV_VENV := /tmp/prouigan-uv
infra-lock:
	test -x $(UV_VENV)/bin/uv || { $(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q "uv==0.13.8"; }
	$(UV_VENV)/bin/uv pip compile pyproject.toml infra/docker/requirements.in --extra eval --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --generate-hashes --index-url https://pypi.org/simple \
	    --no-header --quiet -o infra/docker/requirements.lock
	sed -i '1i # Made by `make infra-lock` from pyproject.toml (core + eval) and infra/docker/requirements.in; do not edit.' \
	    infra/docker/requirements.lock

clean:
	-$(BIN)/prouigan platform down
	rm -rf $(VENV) .platform outputs
