"""The test bed is real: its guests boot under the real libvirtd/QEMU (TCG) and say so on their consoles."""

from __future__ import annotations

import re
import time

import pytest

from tests.testbed.guests import PYTHON_MARKER, Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration


def test_busybox_guest_boots_through_libvirt_and_prints_marker(libvirt_env: LibvirtEnv, busybox_guest: Guest) -> None:
    import libvirt

    dom = libvirt_env.define_guest("busybox", busybox_guest)
    xml = dom.XMLDesc()
    assert "<vmcoreinfo state='on'/>" in xml
    assert "type='qemu'" in xml.splitlines()[0]
    assert dom.name().startswith(libvirt_env.prefix)

    started = time.monotonic()
    dom.create()
    log = libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=120)
    elapsed = time.monotonic() - started

    # The line comes from the root disk's /sbin/init (after switch_root), running the Debian kernel we chose.
    line = next(line for line in log.splitlines() if busybox_guest.marker in line)
    assert re.search(rf"{busybox_guest.marker} kernel={re.escape(busybox_guest.kernel_version)} pid=1\b", line)
    assert dom.isActive()
    print(f"busybox guest boot-to-marker under TCG: {elapsed:.1f} s")

    # qemu_fw_cfg is loaded and vmcoreinfo is on: a memory-only dump carries the guest kernel's VMCOREINFO note.
    dump = libvirt_env.path("busybox.core")
    dom.coreDumpWithFormat(str(dump), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY)
    with dump.open("rb") as fh:
        head = fh.read(1 << 16)
    assert head.startswith(b"\x7fELF")
    assert b"VMCOREINFO" in head
    assert f"OSRELEASE={busybox_guest.kernel_version}\n".encode() in head


def test_busybox_guest_runs_programs_from_its_root_disk_and_powers_off(
    libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom = libvirt_env.define_guest(
        "poweroff", busybox_guest, cmdline_extra="hostguard.run=/usr/local/bin/hello.sh hostguard.poweroff=1"
    )
    dom.create()
    libvirt_env.wait_for_shutoff(dom, timeout=120)
    log = libvirt_env.console_text(dom)
    assert busybox_guest.marker in log
    assert "hello from /usr/local/bin/hello.sh" in log
    assert not dom.isActive()


def test_python_guest_runs_python_with_cryptography(libvirt_env: LibvirtEnv, python_guest: Guest) -> None:
    dom = libvirt_env.define_guest("python", python_guest)
    dom.create()
    log = libvirt_env.wait_for_console(dom, PYTHON_MARKER, timeout=180)
    match = re.search(rf"{PYTHON_MARKER} python=(\d+)\.(\d+)\.\d+ cryptography=(\S+)", log)
    assert match, log[-2000:]
    assert (int(match.group(1)), int(match.group(2))) >= (3, 11)
    assert match.group(3)[0].isdigit()
    assert "/usr/bin/python3.11" in python_guest.expected
