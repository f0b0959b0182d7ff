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


@pytest.mark.parametrize("op", [("started", "begin"), ("release", "end"), ("reconnect", "begin"), ("x", "y")])
def test_run_never_fails_a_notification(tmp_path: Path, op: tuple[str, str]) -> None:
    result = hook(tmp_path, "web1", *op, "-")
    assert (result.returncode, result.stdout) == (0, b"")


def test_run_prints_nothing_on_stdout_for_migrate(tmp_path: Path) -> None:
    result = hook(tmp_path, "web1", "migrate", "begin", "-")
    assert result.returncode == 1 and result.stdout == b""


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
    assert took < 1 + 2 + 5  # the deadline, the watchdog's grace, a loaded machine's start-up
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["verdict"] == ("deny" if mode == "enforce" else "would-deny")
    assert record["duration_ms"] >= 3000
