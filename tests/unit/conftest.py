from __future__ import annotations

from pathlib import Path

import pytest

from hostguard.host.config import Config, load_config
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


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A daemon's configuration with everything under tmp_path (a module may define its own `config`)."""
    cfg = tmp_path / "hostguard.toml"
    cfg.write_text(
        f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n'
        f'[audit]\nlog = "{tmp_path / "audit.jsonl"}"\nsyslog = false\n'
    )
    return load_config(cfg)
