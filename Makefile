# The two commands in the README. Each does its own set-up (idempotent) on a fresh Debian 12 host as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck unit integration bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m tests.testbed.demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -p no:cacheprovider tests

unit:
	$(VENV)/bin/pytest -q tests/unit

integration:
	$(VENV)/bin/pytest -q tests/integration

bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info
