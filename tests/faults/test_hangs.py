"""Hung dependencies (issue 20, item 7): a disk image on a file system that never answers a read, and a
libvirtd that never answers a call. The hook must decide (deny) within its deadline; the daemon must not be
stuck forever. docs/reliability.md lists what was observed."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from pathlib import Path

from tests.faults.test_faults import config_replaced, denial, start_paused
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.hungfs import hung_file
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require, require_module

libvirt = require_module("libvirt")


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
