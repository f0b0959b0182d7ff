"""Integration fixtures: the real libvirtd on qemu:///system."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require, require_root
from tests.testbed.registry import BINARY as REGISTRY_BINARY
from tests.testbed.registry import LocalRegistry


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


def guarded_host() -> Iterator[GuardedHost]:
    """A guarded host: test PKI and trust store, hostguard.toml, the hook installed into the running libvirtd
    (holding the test bed's host-wide lock), all removed afterwards."""
    require_root()
    with GuardedHost() as h:
        yield h


def signed_busybox(host: GuardedHost, busybox_guest: Guest) -> Path:
    """The busybox guest's root disk, inventoried, published and signed as busybox v1."""
    return host.publish(busybox_guest, "busybox", 1)


@pytest.fixture(scope="module")
def host() -> Iterator[GuardedHost]:
    """A guarded host for one test module."""
    yield from guarded_host()


@pytest.fixture(scope="module")
def signed_base(host: GuardedHost, busybox_guest: Guest) -> Path:
    return signed_busybox(host, busybox_guest)


@pytest.fixture(scope="module")
def registry() -> Iterator[LocalRegistry]:
    """A real registry (Debian's docker-registry, distribution 2.8: no referrers API) on 127.0.0.1, for one module."""
    require(shutil.which(REGISTRY_BINARY) is not None, f"{REGISTRY_BINARY} is not installed (Debian docker-registry)")
    with LocalRegistry() as reg:
        yield reg
