"""The fault suite (issue 20): the integration test bed's fixtures (real libvirtd, the installed hook, busybox
guests), each case cleaning up every domain, mount, file and process it made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import host, libvirt_env, signed_base

__all__ = ["host", "libvirt_env", "signed_base"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
