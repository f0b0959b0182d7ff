# The README's two commands are `make demo` and `make test`; each does its own set-up (idempotent) on a fresh
# Debian 12 host as root. `make check` is the fast lane: no root, no libvirtd (ruff, mypy, import rules, unit tests).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup venv demo test check lint typecheck imports unit integration bench clean

setup:
	bash scripts/setup.sh

venv:
	bash scripts/venv.sh

demo: setup
	$(PY) -m tests.testbed.demo

test: setup lint typecheck imports
	$(VENV)/bin/pytest -p no:cacheprovider tests

check: venv lint typecheck imports
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

imports: venv
	$(VENV)/bin/lint-imports

unit: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

integration: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/integration

bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
