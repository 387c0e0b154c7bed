VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-quick test test-fast test-smoke bench lint

setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ilrdpo demo

demo-quick: setup
	$(VENV)/bin/ilrdpo demo --quick

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m unit          # pure functions and input checks: no model, nothing bundled

test-smoke: setup
	$(PY) -m pytest -q -m "not slow"   # plus the tiny-model tests

bench: setup
	$(PY) benchmarks/train_throughput.py

lint:
	$(VENV)/bin/ruff check src tests benchmarks
