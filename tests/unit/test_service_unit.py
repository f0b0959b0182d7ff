"""hostguardd.service: `systemd-analyze verify` clean, and its sandbox fits what the daemon writes by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hostguard.host.config import Config
from tests.testbed.prereq import require_tool

DATA = Path(__file__).resolve().parents[2] / "hostguard" / "data"
UNIT = DATA / "hostguardd.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # The unit names /usr/bin/hostguard (the Debian package's); verify checks that it exists, so point it at
    # this checkout's entry point. Its man: links are checked too, against the generated pages.
    hostguard = Path(sys.executable).parent / "hostguard"
    unit = tmp_path / "hostguardd.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/hostguard ", f"ExecStart={hostguard} "))
    env = {**os.environ, "MANPATH": str(DATA / "man")}
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_notify_watchdog_and_restart() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) >= 10 and s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == ["/usr/bin/hostguard daemon"]
    assert set(s["After"][0].split()) == {"libvirtd.service", "virtqemud.service"}


def test_sandbox_keeps_what_the_daemon_needs() -> None:
    s = settings()
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["true"] and s["PrivateTmp"] == ["true"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert caps == {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_DAC_OVERRIDE"}  # /proc/PID/mem, images
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    writable = [Path(p) for p in s["ReadWritePaths"][0].split()]
    # Every path the daemon writes with the default configuration is inside ReadWritePaths.
    config = Config({"trust": {"dir": "/etc/hostguard/trust"}}, Path("hostguard.toml"))
    for path in (config.state_dir, config.audit_log, config.daemon_socket, config.library_dir):
        assert any(path.is_relative_to(w) for w in writable), path
