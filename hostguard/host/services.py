"""Start and restart libvirtd, with systemd when it is PID 1 and by hand otherwise.

libvirtd reads its hook scripts only when it starts, so installing the hook needs a restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hostguard.errors import ConfigError

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")


def _has_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _pids(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _wait(predicate: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise ConfigError(f"{what} within {seconds:.0f} s")


def libvirtd_answers() -> bool:
    if not LIBVIRT_SOCKET.exists():
        return False
    probe = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, check=False)
    return probe.returncode == 0


def restart_libvirtd() -> None:
    if _has_systemd():
        subprocess.run(["systemctl", "restart", "libvirtd.service"], check=True)
    else:
        for pid in _pids("libvirtd"):
            os.kill(pid, signal.SIGTERM)
        _wait(lambda: not _pids("libvirtd"), 30, "libvirtd did not stop")
        Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        if not _pids("virtlogd"):
            subprocess.run(["virtlogd", "--daemon"], check=True)
        subprocess.run(["libvirtd", "--daemon"], check=True)
    _wait(libvirtd_answers, 30, "libvirtd did not answer on its socket")


def libvirt_version() -> tuple[int, int]:
    exe = shutil.which("libvirtd")
    if exe is None:
        raise ConfigError("libvirtd is not installed")
    text = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    parts = text.strip().split()[-1].split(".") if text.strip() else []
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ConfigError(f"cannot tell the libvirt version from {text.strip()!r}") from None
