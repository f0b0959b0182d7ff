"""Prerequisite checks for tests: skip locally, fail in CI (CI=true) so a broken CI host cannot pass."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(condition: bool, why: str) -> None:
    """If `condition` is false: `pytest.fail(why)` when CI=true, else `pytest.skip(why)`."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing (CI=true): {why}", pytrace=False)
    pytest.skip(why)


def require_tool(name: str) -> str:
    """Require an executable on PATH; returns its full path."""
    path = shutil.which(name)
    require(path is not None, f"tool {name!r} not found on PATH")
    assert path is not None
    return path


def require_root() -> None:
    require(os.geteuid() == 0, "this test needs root")
