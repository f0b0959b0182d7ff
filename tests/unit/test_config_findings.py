"""`[findings]` in hostguard.toml is validated when the daemon or `hostguard start` loads it, not at each check."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostguard.cli import main
from hostguard.errors import ConfigError
from hostguard.host.config import load_config


def write_config(tmp_path: Path, findings: str) -> Path:
    path = tmp_path / "hostguard.toml"
    path.write_text(f'[trust]\ndir = "{tmp_path}/trust"\n[state]\ndir = "{tmp_path}/state"\n{findings}')
    return path


def test_a_typo_in_a_finding_kind_stops_the_daemon_at_start_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, '[findings.action]\nunexpected-executabel = "destroy"\n')
    with pytest.raises(ConfigError, match="unknown finding kind 'unexpected-executabel'") as info:
        load_config(config).finding_policy()
    assert str(config) in str(info.value)
    assert main(["daemon", "--config", str(config), "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected-executabel" in err[0]


def test_a_valid_findings_table_builds_its_policy_once(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, '[findings.action]\nunexpected-executable = "destroy"\n'))
    policy = config.finding_policy()
    assert policy.actions["unexpected-executable"] == "destroy"
    assert config.finding_policy() is policy
