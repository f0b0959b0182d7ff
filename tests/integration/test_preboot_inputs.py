"""Issue 14's pre-boot bypasses against the real libvirtd: libvirt's own QEMU command line
(`virsh domxml-to-native qemu-argv`) shows that QEMU would open the attacker's file, and the installed hook
refuses `virsh start` of that very definition in one line. Legitimate shapes (KubeVirt's explicit chain)
still start."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_preboot_hook import denial, start_error
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration


def qemu_argv(env: LibvirtEnv, xml: str, name: str) -> str:
    """The QEMU command line libvirt would run for `xml` (no hook involved)."""
    path = env.path(f"{name}.xml")
    path.write_text(xml)
    result = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domxml-to-native", "qemu-argv", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def define(env: LibvirtEnv, xml: str, name: str) -> Any:
    """Define `xml` (made by `env.domain_xml(name, ...)`) as define_guest would: cleaned up, console known."""
    full = env.domain_name(name)
    env.names.append(full)
    env.consoles[full] = env.path(f"{name}-console.log")
    return env.connection().defineXML(xml)


def with_backing(xml: str, disk: Path, chain: str) -> str:
    from xml.sax.saxutils import quoteattr

    source = f"<source file={quoteattr(str(disk))}/>"  # as LibvirtEnv writes it
    assert source in xml
    return xml.replace(source, source + chain, 1)


def backing(path: Path, fmt: str = "qcow2", inner: str = "<backingStore/>") -> str:
    return f"<backingStore type='file'><format type='{fmt}'/><source file='{path}'/>{inner}</backingStore>"


def test_xml_backing_store_naming_an_unsigned_base_is_what_qemu_would_open_and_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(signed_base, "bs-top.qcow2")  # its header names the signed base
    evil = libvirt_env.copy_disk(busybox_guest.root_qcow2, "bs-unsigned.qcow2")
    xml = with_backing(libvirt_env.domain_xml("bs-evil", busybox_guest, disk_path=overlay), overlay, backing(evil))
    argv = qemu_argv(libvirt_env, xml, "bs-evil")
    assert f'"filename":"{evil}"' in argv and f'"filename":"{signed_base}"' not in argv  # the attack is real
    line = denial(start_error(define(libvirt_env, xml, "bs-evil")))
    assert f"names file {evil} (qcow2) but the image header chain has {signed_base}" in line


def test_xml_backing_store_under_a_standalone_signed_image_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    image = libvirt_env.copy_disk(signed_base, "bs-standalone.qcow2")
    Path(f"{image}.hgsig").write_bytes(Path(f"{signed_base}.hgsig").read_bytes())  # the same signed image
    evil = libvirt_env.copy_disk(busybox_guest.root_qcow2, "bs-under.qcow2")
    xml = with_backing(libvirt_env.domain_xml("bs-under", busybox_guest, disk_path=image), image, backing(evil))
    assert '"backing":"libvirt-2-format"' in qemu_argv(libvirt_env, xml, "bs-under")  # QEMU gets a backing node
    assert "adds a layer under" in denial(start_error(define(libvirt_env, xml, "bs-under")))


def test_kubevirt_s_explicit_chain_that_agrees_with_the_headers_starts(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(signed_base, "kv-disk.qcow2")
    xml = with_backing(libvirt_env.domain_xml("kv", busybox_guest, disk_path=overlay), overlay, backing(signed_base))
    argv = qemu_argv(libvirt_env, xml, "kv")
    assert f'"filename":"{signed_base}"' in argv
    dom = define(libvirt_env, xml, "kv")
    dom.create()
    libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)


def test_a_kernel_path_with_a_trailing_space_reaches_qemu_verbatim_and_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    xml = libvirt_env.domain_xml("ws", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "ws.qcow2"))
    kernel = xml.split("<kernel>", 1)[1].split("</kernel>", 1)[0]
    Path(kernel + " ").write_bytes(b"not the signed kernel")
    xml = xml.replace(f"<kernel>{kernel}</kernel>", f"<kernel>{kernel} </kernel>")
    assert f"-kernel '{kernel} '" in qemu_argv(libvirt_env, xml, "ws")  # libvirt strips nothing
    assert "has leading or trailing whitespace" in denial(start_error(define(libvirt_env, xml, "ws")))


def test_an_emulator_wrapper_is_refused_by_the_installed_hook(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    # A wrapper that libvirt accepts as an emulator could add any QEMU argument.
    wrapper = libvirt_env.path("qemu-wrapper")
    wrapper.write_text('#!/bin/sh\nexec /usr/bin/qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    xml = libvirt_env.domain_xml("emu", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "emu.qcow2"))
    xml = xml.replace("<devices>", f"<devices><emulator>{wrapper}</emulator>", 1)
    line = denial(start_error(define(libvirt_env, xml, "emu")))
    assert f"emulator {wrapper} is not a known QEMU binary" in line


def test_restore_is_refused_in_one_line_unless_policy_allows_it(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    xml = libvirt_env.domain_xml("rst", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "rst.qcow2"))
    xml = xml.replace("<memory", "<uuid>6b3c9a44-5c4e-4b61-9a43-3fb1f6a1c0ff</uuid><memory", 1)
    host.write_config(allow_restore="false", allow_incoming_migration="false")
    try:
        for op, key in (("restore", "allow_restore"), ("migrate", "allow_incoming_migration")):
            result = host.run_hook(libvirt_env.domain_name("rst"), op, "begin", "-", xml=xml.encode())
            err = result.stderr.decode()
            assert result.returncode == 1 and result.stdout == b"" and err.count("\n") == 1, err
            assert f"[policy] {key} = true" in err
    finally:
        host.write_config()


def test_a_pflash_loader_without_readonly_is_opened_writable_by_qemu_and_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    firmware = "/usr/share/seabios/bios-256k.bin"  # a shared file every domain boots
    xml = libvirt_env.domain_xml("pfl", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "pfl.qcow2"))
    xml = xml.replace("<kernel>", f"<loader type='pflash'>{firmware}</loader><kernel>", 1)
    argv = qemu_argv(libvirt_env, xml, "pfl")
    assert f'"filename":"{firmware}","node-name":"libvirt-pflash0-storage"' in argv
    assert '"node-name":"libvirt-pflash0-format","read-only":false' in argv  # the attack is real
    assert "would be opened writable" in denial(start_error(define(libvirt_env, xml, "pfl")))
