VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-quick test test-fast test-smoke bench lint

setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ilrdpo demo

demo-quick: setup
	$(VENV)/bin/ilrdpo demo --quick

# Tests run on every core (pytest-xdist); tiers in README.md "The two commands". worksteal: a worker
# that runs out of tests takes half of another's queue (the default scheduler hands each worker an
# eighth of the suite up front, the slow tests all to one worker, and never moves them).
test: setup
	$(PY) -m pytest -q -n auto --dist worksteal --durations=25

test-fast: setup
	$(PY) -m pytest -q -m unit         # pure functions and input checks: no process, no model, nothing bundled

test-smoke: setup
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"   # plus the tiny-model tests

bench: setup
	$(PY) benchmarks/train_throughput.py

lint:
	$(VENV)/bin/ruff check src tests benchmarks
