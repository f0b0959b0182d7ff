"""The fault suite (issue 20): the integration test bed's fixtures (real libvirtd, the installed hook, busybox
guests), each case cleaning up every domain, mount, file and process it made. One guarded host serves the whole
package (installing the hook restarts libvirtd and waits for the host-wide test lock: once, not per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import guarded_host, libvirt_env, signed_busybox
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest

__all__ = ["host", "libvirt_env", "signed_base"]


@pytest.fixture(scope="package")
def host() -> Iterator[GuardedHost]:
    yield from guarded_host()


@pytest.fixture(scope="package")
def signed_base(host: GuardedHost, busybox_guest: Guest) -> Path:
    return signed_busybox(host, busybox_guest)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
