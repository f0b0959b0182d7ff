# The README's two commands are `make demo` and `make test`; each does its own set-up (idempotent) on a fresh
# Debian 12 host as root. `make check` is the fast lane: no root, no libvirtd (ruff, mypy, import rules, unit tests).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup venv demo test check lint typecheck imports unit integration bench clean man dist deb

setup:
	bash scripts/setup.sh

venv:
	bash scripts/venv.sh

demo: setup
	$(PY) -m tests.testbed.demo

test: setup lint typecheck imports
	$(VENV)/bin/pytest -p no:cacheprovider tests

check: venv lint typecheck imports
	$(VENV)/bin/pytest -q -p no:cacheprovider -n auto tests/unit

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

# Man pages and bash completion, generated from the argparse definitions and the configuration schema
# (tests/unit/test_manpages.py fails when the committed files differ from what this makes).
man: venv
	$(PY) -c 'import sys; from pathlib import Path; from hostguard.cli import build_parser; \
	from hostguard.commands.manpages import write_all; write_all(build_parser(), Path("hostguard/data"))'

# Wheel and sdist in dist/.
dist: venv
	$(PY) -m build --no-isolation --outdir dist .

# The Debian package (dh-virtualenv), built in build/deb/ from a copy of the tree with packaging/debian/ as its
# debian/: nothing is written at the top level. Needs debhelper and dh-virtualenv (apt-get install dh-virtualenv).
deb:
	rm -rf build/deb && mkdir -p build/deb/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -P --parents -t build/deb/src
	cp -r packaging/debian build/deb/src/debian
	cd build/deb/src && dpkg-buildpackage -us -uc -b
	@ls -1 build/deb/*.deb

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
