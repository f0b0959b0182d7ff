from __future__ import annotations

import pytest

from tests.testbed.pki import TestPKI


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    return TestPKI()
