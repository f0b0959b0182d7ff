"""The test bed is real: its guests boot under the real libvirtd/QEMU (TCG) and say so on their consoles."""

from __future__ import annotations

import re
import time

import pytest

from tests.testbed.guests import PYTHON_MARKER, Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration


def test_busybox_guest_boots_through_libvirt_and_prints_marker(
    libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = libvirt_env.define_guest("busybox", busybox_guest)
    xml = dom.XMLDesc()
    assert "<vmcoreinfo state='on'/>" in xml
    assert libvirt_env.prefix in dom.name()

    started = time.monotonic()
    dom.create()
    log = libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=120)
    elapsed = time.monotonic() - started

    # The line comes from the root disk's /sbin/init (after switch_root), running the Debian kernel we chose.
    line = next(line for line in log.splitlines() if busybox_guest.marker in line)
    assert re.search(rf"{busybox_guest.marker} kernel={re.escape(busybox_guest.kernel_version)} pid=1\b", line)
    assert dom.isActive()
    print(f"busybox guest boot-to-marker under TCG: {elapsed:.1f} s")


def test_busybox_guest_powers_off_on_request(libvirt_env: LibvirtEnv, busybox_guest: Guest) -> None:
    dom = libvirt_env.define_guest("poweroff", busybox_guest, cmdline_extra="hostguard.poweroff=1")
    dom.create()
    libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=120)
    libvirt_env.wait_for_shutoff(dom, timeout=60)
    assert not dom.isActive()


def test_python_guest_runs_python_with_cryptography(libvirt_env: LibvirtEnv, python_guest: Guest) -> None:
    dom = libvirt_env.define_guest("python", python_guest)
    dom.create()
    log = libvirt_env.wait_for_console(dom, PYTHON_MARKER, timeout=180)
    match = re.search(rf"{PYTHON_MARKER} python=(\d+)\.(\d+)\.\d+ cryptography=(\S+)", log)
    assert match, log[-2000:]
    assert (int(match.group(1)), int(match.group(2))) >= (3, 11)
    assert match.group(3)[0].isdigit()
