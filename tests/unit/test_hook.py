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


# A decision stuck where no signal reaches Python: SIGALRM blocked in the main thread, as for a read blocked in
# the kernel on a hung FUSE or NFS file system (the real one: tests/faults/test_hangs.py).
STUCK = (
    "import signal, sys, time\n"
    "import hostguard.preboot.decide as d\n"
    "def stuck(*_a, **_k):\n"
    "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
    "    time.sleep(600)\n"
    "d.decide = stuck\n"
    "from hostguard.hook import run\n"
    "run(sys.argv[1:])\n"
)


@pytest.mark.parametrize(("mode", "code", "said"), [("enforce", 1, "denied"), ("audit", 0, "audit mode, would deny")])
def test_a_decision_stuck_beyond_the_deadlines_signal_is_denied_by_the_watchdog(
    tmp_path: Path, mode: str, code: int, said: str
) -> None:
    import json
    import time

    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "hostguard.toml"
    config.write_text(
        f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n[policy]\nmode = "{mode}"\n'
        f'deadline_seconds = 1\n[audit]\nlog = "{audit}"\nsyslog = false\n'
    )
    env = {"PATH": "/usr/bin:/bin", "HOSTGUARD_CONFIG": str(config), "HOSTGUARD_HOOK_LOG": str(tmp_path / "hook.log")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", STUCK, "web1", "prepare", "begin", "-"],
        input=b"<domain/>",
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - started
    assert (result.returncode, result.stdout) == (code, b"")
    assert result.stderr.decode() == (
        f"hostguard: {said} web1: verification did not finish within the deadline (1 s): it is blocked in the "
        "kernel (a hung file system or device holding one of the domain's files?)\n"
    )
    assert took < 60  # bounded, not timed: without the watchdog it would sleep 600 s
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["verdict"] == ("deny" if mode == "enforce" else "would-deny")
    assert record["duration_ms"] >= 3000
