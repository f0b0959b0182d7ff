#!/usr/bin/env bash
# The project venv at .venv/, without root: `make check` needs only this; `make setup` (root) adds Debian's
# packages and libvirtd around it. The venv sees Debian's python3-libvirt and python3-guestfs (not on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.hostguard-installed
if [ ! -x .venv/bin/python ]; then
  echo "venv: creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "venv: installing hostguard (editable) and its Python dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
