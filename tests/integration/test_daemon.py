"""hostguardd against the real libvirtd: verdicts, actions, quarantine, crash and reconnect, a burst of starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


class DaemonProcess:
    """`hostguard daemon` as a real process, with its own config file."""

    def __init__(self, host: GuardedHost, config: Path) -> None:
        self.host = host
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = host.dir / f"daemon-{config.stem}.log"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostguard.cli", "daemon", "--config", str(self.config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0


def config_with(host: GuardedHost, name: str, policy: str) -> Path:
    """A copy of the host's config with extra [policy] lines (the daemon reads its config at start)."""
    path = host.dir / f"{name}.toml"
    text = host.config.read_text().replace("[policy]\n", f"[policy]\n{policy}\n", 1)
    path.write_text(text)
    return path


@pytest.fixture
def daemon(host: GuardedHost) -> Iterator[DaemonProcess]:
    d = DaemonProcess(host, host.config)
    d.start()
    yield d
    d.kill()


def wait_verdict(
    host: GuardedHost, dom: Any, after: float, timeout: float = 120, trigger: str | tuple[str, ...] | None = None
) -> dict[str, Any]:
    path = host.state / "verdicts" / f"{dom.UUIDString()}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            v = json.loads(path.read_text())
            stamp = time.mktime(time.strptime(v["checked_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
            if stamp >= int(after) - 1 and (trigger is None or v["trigger"].startswith(trigger)):
                return v  # type: ignore[no-any-return]
        time.sleep(0.2)
    pytest.fail(f"no verdict for {dom.name()} within {timeout} s")


def test_clean_guest_passes_and_keeps_running(
    host: GuardedHost, signed_base: Path, daemon: DaemonProcess, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    t = time.time()
    dom = libvirt_env.boot("clean", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "clean.qcow2"))
    verdict = wait_verdict(host, dom, t)
    assert verdict["status"] == "pass", verdict
    assert dom.isActive() and dom.info()[0] == 1  # running
    meta = subprocess.run(
        ["virsh", "metadata", dom.name(), "--uri", "https://hostguard.dev/xmlns/verdict/1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'status="pass"' in meta


def test_unsigned_disk_hotplugged_after_start_pauses_the_domain(
    host: GuardedHost, signed_base: Path, daemon: DaemonProcess, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = libvirt_env.boot("hotplug", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "hotplug.qcow2"))
    wait_verdict(host, dom, time.time() - 60)
    extra = libvirt_env.path("hotplug-extra.raw")
    extra.write_bytes(b"\0" * (1 << 20))
    t = time.time()
    subprocess.run(
        ["virsh", "attach-disk", dom.name(), str(extra), "vdb", "--driver", "qemu", "--subdriver", "raw", "--live"],
        check=True,
        capture_output=True,
    )
    # The hook is not called for a hot-plug: the daemon's DEVICE_ADDED event brings it back.
    verdict = wait_verdict(host, dom, t, trigger="device-added:")
    assert verdict["status"] == "fail"
    assert [f["kind"] for f in verdict["findings"]] == ["unsigned-hotplug-disk"]
    state = subprocess.run(["virsh", "domstate", dom.name(), "--reason"], capture_output=True, text=True).stdout
    assert state.startswith("paused")
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "hostguard.cli", "status", dom.name(), "--json", "--config", str(host.config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert status[0]["postcheck"] == "fail" and status[0]["state"] == "paused"
    assert status[0]["trigger"] == verdict["trigger"] and status[0]["stats"] == verdict["stats"]
    assert status[0]["duration_ms"] == verdict["duration_ms"]


def test_destroy_policy_destroys_on_a_finding(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = libvirt_env.boot("destroy", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "destroy.qcow2"))
    extra = libvirt_env.path("destroy-extra.raw")
    extra.write_bytes(b"\0" * (1 << 20))
    subprocess.run(
        ["virsh", "attach-disk", dom.name(), str(extra), "vdb", "--driver", "qemu", "--subdriver", "raw", "--live"],
        check=True,
        capture_output=True,
    )
    config = config_with(host, "destroy", 'action = "destroy"')
    subprocess.run(
        [sys.executable, "-m", "hostguard.cli", "daemon", "--once", "--config", str(config)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert not dom.isActive()
    verdict = json.loads((host.state / "verdicts" / f"{dom.UUIDString()}.json").read_text())
    assert verdict["action"] == "destroy"  # the record survives the destroy


def test_hostguard_start_resumes_only_after_a_pass(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = libvirt_env.define_guest("qstart", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "q.qcow2"))
    result = subprocess.run(
        [sys.executable, "-m", "hostguard.cli", "start", dom.name(), "--config", str(host.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert dom.info()[0] == 1  # running
    libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=120)


def test_daemon_killed_mid_check_checks_the_domain_after_restart(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    d = DaemonProcess(host, host.config)
    d.start()
    try:
        time.sleep(1.5)  # connected
        dom = libvirt_env.define_guest("crash", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "c.qcow2"))
        dom.create()
        d.kill(signal.SIGKILL)  # the STARTED event arrived; its check is queued or running
        t = time.time()
        d.start()
        verdict = wait_verdict(host, dom, t)
        assert verdict["status"] == "pass" and verdict["trigger"] in ("daemon-start", "started")
    finally:
        d.kill()


def test_libvirtd_restart_makes_the_daemon_reconnect_and_recheck(
    host: GuardedHost, signed_base: Path, daemon: DaemonProcess, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = libvirt_env.boot("reconn", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "r.qcow2"))
    wait_verdict(host, dom, time.time() - 60)
    t = time.time()
    subprocess.run(["bash", "scripts/libvirtd.sh", "restart"], check=True, cwd=REPO)
    # libvirtd runs the hook's `reconnect` for every running domain as it starts, which notifies the daemon: that
    # notification and the daemon's own reconnect race to queue the domain (one queue entry per domain), so the
    # re-check's trigger is "reconnect" or "hook-reconnect" (waiting for "reconnect" only failed 2 runs in 5).
    try:
        verdict = wait_verdict(host, dom, t, trigger=("reconnect", "hook-reconnect"))
    except BaseException:
        print(daemon.log.read_text()[-5000:])  # what the daemon did instead
        raise
    assert verdict["status"] == "pass"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_twenty_domains_started_in_a_burst_are_all_checked(
    host: GuardedHost, signed_base: Path, daemon: DaemonProcess, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    import libvirt

    doms = [
        libvirt_env.define_guest(
            f"burst-{i}", busybox_guest, memory_mib=64, disk_path=libvirt_env.overlay(signed_base, f"burst-{i}.qcow2")
        )
        for i in range(20)
    ]
    t = time.time()
    for dom in doms:
        # Started paused: the burst of STARTED events is real, without 20 TCG guests fighting over 2 cores.
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    verdicts = [wait_verdict(host, dom, t, timeout=300) for dom in doms]
    assert all(v["status"] == "pass" for v in verdicts), [v["reason"] for v in verdicts if v["status"] != "pass"]
    peak = daemon.peak_rss_kib()
    print(f"burst of 20: daemon peak RSS {peak / 1024:.0f} MiB")
    assert peak < 512 * 1024
