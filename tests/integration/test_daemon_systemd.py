"""`hostguard daemon` as systemd runs it (Type=notify, WatchdogSec=): READY=1 once connected to the real
libvirtd, WATCHDOG=1 while libvirt's event loop turns, STOPPING=1 on SIGTERM. The notify socket is ours."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.prereq import require_root

pytestmark = pytest.mark.integration


def test_daemon_reports_ready_pings_the_watchdog_and_stopping(tmp_path: Path) -> None:
    require_root()
    host = GuardedHost(install_hook=False)  # a config, trust store and state for this daemon; no hook
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
        env.pop("WATCHDOG_PID", None)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "hostguard.cli", "daemon", "--config", str(host.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert sock.recv(4096).startswith(b"READY=1\n")
            started = time.monotonic()
            pings = [sock.recv(4096) for _ in range(3)]
            assert pings == [b"WATCHDOG=1"] * 3
            assert time.monotonic() - started < 6  # every WatchdogSec/2 = 1 s, give or take a busy host
            daemon.send_signal(signal.SIGTERM)
            while (msg := sock.recv(4096)) == b"WATCHDOG=1":
                pass
            assert msg == b"STOPPING=1"
            assert daemon.wait(timeout=60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            host.close()
