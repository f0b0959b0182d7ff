from __future__ import annotations

import pytest

from tests.testbed.pki import TestPKI


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(autouse=True)
def no_host_journal(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Unit tests never write to the host's journal: audit records fall back to syslog (which tests may
    capture), the same on a host with journald as without. tests/unit/test_systemd.py points it at fakes."""
    from hostguard.host import systemd

    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", str(tmp_path_factory.getbasetemp() / "no-journald"))
