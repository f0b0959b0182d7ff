"""Sticky enforcement against the real libvirtd with the daemon running (issue 15 item 6, ADR 0020): a tampered
guest hostguard paused is paused again within 2 s of a `virsh resume`; `hostguard release` lets it run, with an
audit line naming the reason; a clean guest an admin pauses and resumes is left alone."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon import DaemonProcess, wait_verdict
from tests.integration.test_daemon_disk import changed_root, write_through_qemu
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_daemon(host: GuardedHost) -> Iterator[DaemonProcess]:
    """`hostguard daemon` on the host's config as it is now, connected and listening for events."""
    d = DaemonProcess(host, host.config)
    d.start()
    try:
        time.sleep(1.5)
        yield d
    finally:
        d.kill()


@pytest.fixture
def daemon(host: GuardedHost) -> Iterator[DaemonProcess]:
    with running_daemon(host) as d:
        yield d


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", *args], capture_output=True, text=True, check=True).stdout.strip()


def state_of(dom: Any) -> str:
    return virsh("domstate", dom.name())


def wait_state(dom: Any, wanted: str, timeout: float) -> float:
    """Seconds until `virsh domstate` says `wanted`; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if state_of(dom) == wanted:
            return time.monotonic() - start
        time.sleep(0.05)
    pytest.fail(f"{dom.name()} not {wanted} within {timeout} s: {state_of(dom)}")


def tamper_at_first_resume(env: LibvirtEnv, dom: Any, disk: Path, guest: Guest, commands: list[str]) -> float:
    """A domain started paused and judged clean (by the hook, which reads an overlay's clusters before boot, and
    by the daemon's first check) gets the debugfs `commands`' change written into its disk through QEMU's block
    layer, then its first resume, as Nova resumes after its start-paused wait: the daemon checks it then. Returns
    the time before the write (the verdict to wait for comes after it)."""
    before, after = changed_root(guest, env.workdir, commands)
    t = time.time()
    assert write_through_qemu(env, dom, disk, before, after) > 0  # ends with dom.resume()
    return t


def hostguard(host: GuardedHost, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hostguard.cli", *args, "--config", str(host.config)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def audit_for(host: GuardedHost, dom: Any, operation: str) -> list[dict[str, Any]]:
    return [r for r in host.audit_records() if r.get("uuid") == dom.UUIDString() and r.get("operation") == operation]


def test_virsh_resume_of_a_guest_hostguard_paused_is_undone_until_an_admin_releases_it(
    host: GuardedHost, signed_base: Path, daemon: DaemonProcess, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    disk = libvirt_env.overlay(signed_base, "sticky.qcow2")
    dom = libvirt_env.define_guest("sticky", busybox_guest, disk_path=disk)
    t = time.time()
    virsh("start", "--paused", dom.name())
    assert wait_verdict(host, dom, t)["status"] == "pass"
    t = tamper_at_first_resume(libvirt_env, dom, disk, busybox_guest, ["sif /bin/busybox mode 0104755"])
    verdict = wait_verdict(host, dom, t, trigger="resumed")
    assert verdict["status"] == "fail" and verdict["action"] == "pause", verdict
    wait_state(dom, "paused", 10)

    # Anyone resumes it (virsh, Nova's resume(), `nova unpause`): paused again at once.
    virsh("resume", dom.name())
    took = wait_state(dom, "paused", 2.0)
    seen, again = audit_for(host, dom, "held-domain-running"), audit_for(host, dom, "held-domain-paused")
    assert len(seen) == 1 and len(again) == 1, host.audit_records()[-4:]
    assert seen[0]["seen"] == "resumed" and again[0]["result"] == "ok" and again[0]["after_ms"] < 2000
    assert seen[0]["at"] <= again[0]["at"] and "finding" in again[0]["hold"]
    print(f"re-paused {took:.2f} s after virsh resume (daemon: {again[0]['after_ms']} ms after the event)")

    # The admin's explicit act: it runs, and stays running (until its next check).
    reason = "reviewed the setuid busybox, ticket 4711"
    release = hostguard(host, "release", dom.name(), "--reason", reason)
    assert release.returncode == 0, release.stderr
    assert "released and resumed" in release.stderr
    time.sleep(3)
    assert state_of(dom) == "running"
    released = audit_for(host, dom, "release")
    assert len(released) == 1 and released[0]["reason"] == reason and released[0]["by"]
    assert len(audit_for(host, dom, "held-domain-paused")) == 1  # nothing re-paused it
    # A second release has nothing to release: one line, exit 2.
    again_release = hostguard(host, "release", dom.name(), "--reason", "x")
    assert again_release.returncode == 2 and "not held by hostguard" in again_release.stderr


def test_a_clean_guest_an_admin_pauses_and_resumes_is_untouched(
    host: GuardedHost, signed_base: Path, daemon: DaemonProcess, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    t = time.time()
    dom = libvirt_env.boot("sticky-clean", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "sc.qcow2"))
    assert wait_verdict(host, dom, t)["status"] == "pass"
    virsh("suspend", dom.name())
    time.sleep(0.5)
    virsh("resume", dom.name())
    time.sleep(2.5)
    assert state_of(dom) == "running"
    ops = [str(r.get("operation")) for r in host.audit_records() if r.get("uuid") == dom.UUIDString()]
    assert not [op for op in ops if op.startswith("held-")], ops
