"""Issue 14's content items through the installed hook and the real libvirtd: an overlay written on the host
while its domain was off, and a host-chosen kernel command line for a kernel whose manifest signs the line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.test_preboot_hook import denial, start_error
from tests.integration.test_preboot_inputs import define
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.unit.diskcheck_images import debugfs, overlay_with
from tests.unit.inventory_images import run

pytestmark = pytest.mark.integration


def test_an_executable_planted_in_a_stopped_domain_s_overlay_is_refused_before_boot(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    # The overlay the domain boots from, written on the host while the domain is off (no mount: qemu-io).
    raw, tampered = libvirt_env.path("ov-base.raw"), libvirt_env.path("ov-tampered.raw")
    run("qemu-img", "convert", "-O", "raw", signed_base, raw)
    shutil.copyfile(raw, tampered)
    debugfs(tampered, ["write /usr/bin/true /sbin/evil", "sif /sbin/evil mode 0104755"])
    overlay = overlay_with(signed_base, raw, tampered, libvirt_env.path("ov-planted.qcow2"))
    overlay.chmod(0o644)
    dom = libvirt_env.define_guest("ov-planted", busybox_guest, disk_path=overlay)
    line = denial(start_error(dom))
    assert "the overlay content differs from busybox v1" in line and "unexpected-executable /sbin/evil" in line
    assert not dom.isActive()


@pytest.fixture(scope="module")
def line_image(host: GuardedHost, busybox_guest: Guest) -> Path:
    """The busybox guest signed with its exact kernel command line."""
    return host.publish(busybox_guest, "busybox-line", reader="none", cmdline=busybox_guest.cmdline)


def test_init_appended_to_a_signed_kernel_command_line_is_refused(
    host: GuardedHost, line_image: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(line_image, "line.qcow2")
    xml = libvirt_env.domain_xml("line-evil", busybox_guest, disk_path=overlay, cmdline_extra="init=/bin/sh")
    line = denial(start_error(define(libvirt_env, xml, "line-evil")))
    assert "is not the one busybox-line v1 signs" in line


def test_the_signed_kernel_command_line_itself_is_allowed_by_the_installed_hook(
    host: GuardedHost, line_image: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(line_image, "line-ok.qcow2")
    dom = define(libvirt_env, libvirt_env.domain_xml("line-ok", busybox_guest, disk_path=overlay), "line-ok")
    result = host.run_hook(dom.name(), "prepare", "begin", "-", xml=dom.XMLDesc().encode())
    assert result.returncode == 0, result.stderr.decode()
