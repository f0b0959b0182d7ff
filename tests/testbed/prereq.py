"""Prerequisite checks for tests: skip locally, fail in CI (CI=true) so a broken CI host cannot pass."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(condition: bool, why: str) -> None:
    """If `condition` is false: `pytest.fail(why)` when CI=true, else `pytest.skip(why)`."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing (CI=true): {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)  # also when called at a module's top


def require_tool(name: str) -> str:
    """Require an executable on PATH; returns its full path."""
    path = shutil.which(name)
    require(path is not None, f"tool {name!r} not found on PATH")
    assert path is not None
    return path


def require_root() -> None:
    require(os.geteuid() == 0, "this test needs root")


def require_module(name: str) -> Any:
    """`pytest.importorskip`, except that a missing module fails the test when CI=true."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, f"Python module {name!r} is not importable (Debian: python3-{name})")
