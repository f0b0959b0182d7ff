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


def installed_shim(tmp_path: Path) -> Path:
    from hostguard.commands.hook_cmd import render_shim

    shim = tmp_path / "50-hostguard"
    shim.write_bytes(render_shim(str(tmp_path / "missing.toml")))
    shim.chmod(0o755)
    return shim


def test_installed_shim_ignores_python_variables_and_user_site(tmp_path: Path) -> None:
    # A root process started at every VM start: PYTHONPATH or PYTHONSTARTUP from libvirtd's environment must not
    # decide which `hostguard` it imports (the shim runs `python -IS` with its import path written at install).
    evil = tmp_path / "evil" / "hostguard"
    evil.mkdir(parents=True)
    (evil / "__init__.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(evil.parent), "HOSTGUARD_HOOK_LOG": str(tmp_path / "log")}
    result = subprocess.run([str(installed_shim(tmp_path)), "web1", "prepare", "begin", "-"], input=b"<domain/>",
                            capture_output=True, env=env, check=False)  # fmt: skip
    assert not (tmp_path / "pwned").exists()
    assert result.returncode == 1 and result.stderr.decode().startswith("hostguard: denied web1: cannot read config")


def test_installed_shim_runs_without_site_and_finds_hostguard(tmp_path: Path) -> None:
    shebang = installed_shim(tmp_path).read_text().split("\n", 1)[0]
    assert shebang == f"#!{sys.executable} -IS"
    probe = "import sys; print(sys.flags.isolated, sys.flags.no_site, 'site' in sys.modules)"
    code = installed_shim(tmp_path).read_text().split("# hostguard libvirt hook shim", 1)[0] + probe
    out = subprocess.run([sys.executable, "-IS", "-c", code, "x"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "False"]
    find = code.replace(probe, "import hostguard.hook, hostguard.preboot.decide; print(hostguard.hook.__file__)")
    out = subprocess.run([sys.executable, "-IS", "-c", find], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(Path(__file__).resolve().parents[2] / "hostguard" / "hook.py")
