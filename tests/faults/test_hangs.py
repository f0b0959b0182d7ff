"""Hung dependencies (issue 20, item 7): a disk image on a file system that never answers a read, and a
libvirtd that never answers a call. The hook must decide (deny) within its deadline; the daemon must not be
stuck forever. docs/reliability.md lists what was observed."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.test_faults import config_replaced, denial, start_paused
from tests.integration.test_daemon import DaemonProcess, config_with
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.hungfs import hung_file, passthrough_storage
from tests.testbed.images import run
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require, require_module

libvirt = require_module("libvirt")
CHECK_DEADLINE = 8  # [daemon] check_deadline_seconds of the daemon test (a first check may build the base index)


def deadline_of(host: GuardedHost, seconds: int) -> contextlib.AbstractContextManager[None]:
    """The hook decides under a `seconds` deadline."""
    return config_replaced(host, "deadline_seconds = 60", f"deadline_seconds = {seconds}")


def test_disk_image_on_a_hung_file_system_is_denied_within_the_hook_deadline(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    """A read blocked in the kernel is not interrupted by the deadline's SIGALRM (FUSE waits killably once the
    request is out): before the hook's watchdog thread, the hook, and with it the start and libvirtd's job on
    the domain, hung until the file system answered."""
    require(Path("/dev/fuse").exists(), "/dev/fuse is missing")
    require(importlib.util.find_spec("fusepy") is not None, "python3-fusepy is not installed")
    with deadline_of(host, 3), hung_file(host.dir / "hung") as disk:
        dom = libvirt_env.define_guest("hung", busybox_guest, disk_path=disk)
        outcome: list[str | None] = []
        started = time.monotonic()
        starter = threading.Thread(target=lambda: outcome.append(start_paused(dom)), daemon=True)
        starter.start()
        starter.join(timeout=120)
        took = time.monotonic() - started
        assert outcome, f"the start did not end within {took:.0f} s (the hook hangs on the hung file system)"
    line = denial(outcome[0])
    print(f"hung disk image: decided in {took:.1f} s: {line}")
    assert "verification did not finish within the deadline (3 s): it is blocked in the kernel" in line
    assert took < 3 + 2 + 15  # deadline, the watchdog's grace, libvirtd and a loaded machine
    assert not dom.isActive()
    [record] = [r for r in host.audit_records() if r.get("domain") == dom.name()]
    assert record["verdict"] == "deny" and str(record["reason"]) in line


def checks_of(host: GuardedHost, dom: Any, since: int) -> list[dict[str, Any]]:
    """The daemon's post-start checks of `dom` in the audit log, from its line `since` on (in order)."""
    return [
        r
        for r in host.audit_records()[since:]
        if r.get("operation") == "post-start-check" and r.get("uuid") == dom.UUIDString()
    ]


def wait_check(
    host: GuardedHost,
    dom: Any,
    since: int,
    wanted: Callable[[dict[str, Any]], bool],
    timeout: float,
    watch: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The first check of `dom` from audit line `since` on that is `wanted`; `watch` runs at each poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watch()
        found = [r for r in checks_of(host, dom, since) if wanted(r)]
        if found:
            return found[0]
        time.sleep(0.1)
    seen = [(r["status"], r["reason"][:120]) for r in checks_of(host, dom, since)]
    raise AssertionError(f"no such check of {dom.name()} within {timeout:.0f} s; its checks: {seen}")


def test_a_running_guest_whose_disk_storage_hangs_is_given_up_at_the_deadline_and_the_others_still_checked(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    """A running guest's overlay sits on a FUSE file system that serves it (passthrough to a real file) until
    the test makes every read hang: a hung NFS or FUSE server under a running guest. The daemon (one worker,
    `check_deadline_seconds` = 8, a check every 2 s, no memory stage) must give that guest's check up at the
    deadline with an error verdict saying why, resume the guest its disk stage suspended, and go on checking a
    second guest on local storage while the first check is still blocked; the blocked domain is not queued
    again beside its stuck thread. Then the guest is destroyed and the file system unmounted lazily (the server
    ended): the stuck read gets an error, the thread ends, and its late result is logged, not acted on or recorded.

    Only reads hang; writes, fsync, stat, open and chown still answer, so QEMU can still be paused (its flush
    at `stop` answers) and resumed. The busybox guest is idle after boot (root mounted read-only): it issued
    no disk I/O while the storage hung, so QEMU itself never blocked; a guest reading then would leave a
    request in flight in QEMU, and the suspend (QEMU drains its requests at `stop`) would block too."""
    require(Path("/dev/fuse").exists(), "/dev/fuse is missing")
    require(importlib.util.find_spec("fusepy") is not None, "python3-fusepy is not installed")
    config = config_with(host, "hung-storage", "memory_check = false\ncheck_interval_seconds = 2")
    daemon_lines = f"[daemon]\nworkers = 1\ncheck_deadline_seconds = {CHECK_DEADLINE}\n"
    config.write_text(config.read_text().replace("[daemon]\n", daemon_lines, 1))
    daemon = DaemonProcess(host, config)
    log_start = daemon.log.stat().st_size if daemon.log.exists() else 0
    with contextlib.ExitStack() as cleanup:
        # Run last: a thread waiting on a FUSE request the server has taken cannot be killed, not even by SIGKILL
        # (the kernel waits it out), so the daemon ends only after the file system is gone.
        cleanup.callback(daemon.kill)
        storage = cleanup.enter_context(passthrough_storage(libvirt_env.path("hungfs")))
        overlay = storage.store / "hung.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", signed_base, overlay])
        overlay.chmod(0o644)
        hung = libvirt_env.define_guest("hung", busybox_guest, disk_path=storage.mountpoint / overlay.name)
        cleanup.callback(destroyed, hung)  # before the unmount (QEMU holds the file)
        other = libvirt_env.define_guest("other", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "o.qcow2"))
        for dom in (hung, other):
            dom.create()  # through the hook, which reads the overlay through the FUSE file system
        for dom in (hung, other):
            libvirt_env.wait_for_console(dom, busybox_guest.marker)
        since = len(host.audit_records())
        daemon.start()
        for dom in (hung, other):
            wait_check(host, dom, since, lambda r: r["status"] == "pass", timeout=120)

        # The storage hangs: the next check of `hung` blocks in a read, with the guest suspended by its disk stage.
        since = len(host.audit_records())
        storage.hang()
        hung_at = time.monotonic()
        paused_for: list[float] = []

        def watch() -> None:
            if hung.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]:
                paused_for.append(time.monotonic())

        verdict = wait_check(
            host, hung, since, lambda r: r["status"] != "pass", timeout=CHECK_DEADLINE + 60, watch=watch
        )
        given_up_after = time.monotonic() - hung_at
        given_up_index = host.audit_records().index(verdict)
        held_for = paused_for[-1] - paused_for[0] if paused_for else 0.0
        print(
            f"hung storage: {verdict['status']} ({verdict['action']}) {given_up_after:.1f} s after the switch: "
            f"{verdict['reason']}; the guest was seen paused (user) for {held_for:.1f} s"
        )
        assert (verdict["status"], verdict["action"]) == ("error", "log"), verdict
        assert f"its check did not finish within {CHECK_DEADLINE} s" in verdict["reason"], verdict["reason"]
        assert given_up_after < CHECK_DEADLINE + 2 + 20  # a tick, the deadline, a loaded machine
        assert paused_for, "the disk stage never held the guest: the check did not block where it reads the disk"
        assert hung.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED]  # resumed
        assert not (host.state / "held" / hung.UUIDString()).exists()
        assert daemon.proc is not None
        stuck = [t for t in storage.blocked_readers() if Path(f"/proc/{daemon.proc.pid}/task/{t}").exists()]
        assert stuck, f"no thread of the daemon waits in the file system: {storage.blocked_readers()}"

        # The worker goes on: `other` is checked again (twice), while the given-up check is still blocked.
        after = given_up_index + 1
        for _ in range(2):
            check = wait_check(host, other, after, lambda r: r["status"] == "pass", timeout=60)
            after = host.audit_records().index(check) + 1
            took = f"{check['duration_ms']:.0f} ms {check['stages_ms']}"
            print(f"other guest checked meanwhile: {check['status']} in {took}")
            assert "disk-content" in check["stages_ms"]  # a whole check, its disk read
        assert all(Path(f"/proc/{daemon.proc.pid}/task/{t}").exists() for t in stuck)  # still blocked
        assert checks_of(host, hung, given_up_index) == [verdict]  # not queued again beside its stuck check
        assert hung.state()[0] == libvirt.VIR_DOMAIN_RUNNING

        # The end: guest destroyed, storage unmounted lazily and its server ended; the stuck read gets an error.
        since = len(host.audit_records())
        destroyed(hung)
        storage.unmount()
        # The given-up check ends after all (its read fails): not acted on, not recorded (its verdict was the
        # give-up's; what it read, it read from a guest running again, and its outcome is the storage's error).
        ended = f"{hung.name()}: a check given up at its deadline ended after all"
        deadline = time.monotonic() + 60
        while ended not in daemon.log.read_bytes()[log_start:].decode(errors="replace"):
            assert time.monotonic() < deadline, "the given-up check did not end after the unmount"
            time.sleep(0.1)
        print(next(line for line in daemon.log.read_text(errors="replace").splitlines() if ended in line))
        while any(Path(f"/proc/{daemon.proc.pid}/task/{t}").exists() for t in stuck):
            assert time.monotonic() < deadline, "the blocked check thread did not end after the unmount"
            time.sleep(0.1)
        assert checks_of(host, hung, since) == []  # nothing recorded or enforced for the late check
        assert daemon.proc.poll() is None
    log = daemon.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[-5000:]


def destroyed(dom: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
