"""hostguard.hook entry points in a real subprocess: one line on a deny, nothing on stdout, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = "import sys; from hostguard.hook import run; run(sys.argv[1:])"


def hook(tmp_path: Path, *args: str, xml: bytes = b"<domain/>") -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": "/usr/bin:/bin", "HOSTGUARD_CONFIG": str(tmp_path / "missing.toml")}
    env["HOSTGUARD_HOOK_LOG"] = str(tmp_path / "hook.log")
    return subprocess.run([sys.executable, "-c", RUN, *args], input=xml, capture_output=True, env=env, check=False)


def test_run_denies_a_start_in_one_line_when_the_configuration_is_missing(tmp_path: Path) -> None:
    result = hook(tmp_path, "web1", "prepare", "begin", "-")
    assert result.returncode == 1 and result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hostguard: denied web1: cannot read configuration")


@pytest.mark.parametrize("op", [("release", "end"), ("reconnect", "begin"), ("x", "y")])
def test_run_never_fails_a_notification(tmp_path: Path, op: tuple[str, str]) -> None:
    result = hook(tmp_path, "web1", *op, "-")
    assert (result.returncode, result.stdout) == (0, b"")


@pytest.mark.parametrize("op", ["start", "started"])
def test_start_and_started_fail_closed_in_one_line_when_the_configuration_is_missing(tmp_path: Path, op: str) -> None:
    # Since ADR 0018 both compare what QEMU gets with what `prepare` verified: no configuration, no comparison.
    result = hook(tmp_path, "web1", op, "begin", "-")
    assert result.returncode == 1 and result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hostguard: denied web1: cannot read configuration")


def test_run_prints_nothing_on_stdout_for_migrate(tmp_path: Path) -> None:
    result = hook(tmp_path, "web1", "migrate", "begin", "-")
    assert result.returncode == 1 and result.stdout == b""
