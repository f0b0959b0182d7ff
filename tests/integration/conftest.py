"""Integration fixtures: the real libvirtd on qemu:///system."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require, require_root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def libvirt_env() -> Iterator[LibvirtEnv]:
    """A LibvirtEnv for one test; every domain and file it made is removed afterwards, pass or fail."""
    require_root()
    require(importlib.util.find_spec("libvirt") is not None, "python3-libvirt is not importable")
    require(Path("/usr/bin/qemu-system-x86_64").exists(), "qemu-system-x86 is not installed")
    import libvirt

    try:
        env = LibvirtEnv()
    except (libvirt.libvirtError, OSError, subprocess.CalledProcessError) as err:
        require(False, f"cannot connect to qemu:///system: {err}")
        raise
    with env:
        yield env
