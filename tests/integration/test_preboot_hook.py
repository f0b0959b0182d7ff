"""Pre-boot enforcement through the real libvirtd: the installed hook decides every `virsh start`."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import Disk, LibvirtEnv

pytestmark = pytest.mark.integration


def start_error(dom: Any) -> str:
    """Start the domain and return libvirt's error text (the test fails if it starts)."""
    import libvirt

    try:
        dom.create()
    except libvirt.libvirtError as err:
        return str(err)
    pytest.fail("the domain started, but hostguard should have refused it")


def denial(text: str) -> str:
    """The one line hostguard printed, as the virsh user sees it."""
    assert "hostguard: denied" in text, text
    line = text[text.index("hostguard: denied") :]
    assert "\n" not in line.strip()
    return line


def test_signed_guest_starts_and_prints_its_marker(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(signed_base, "signed.qcow2")
    dom = libvirt_env.define_guest("signed", busybox_guest, disk_path=overlay)
    dom.create()
    libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=120)
    record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
    assert record["verdict"] == "allow"
    assert record["images"][0]["image"] == "busybox"  # type: ignore[index]


def test_one_byte_tampered_image_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    image = libvirt_env.copy_disk(signed_base, "tampered.qcow2")
    shutil.copyfile(str(signed_base) + ".hgsig", str(image) + ".hgsig")
    with image.open("r+b") as fh:
        fh.seek(1024 * 1024)
        byte = fh.read(1)
        fh.seek(1024 * 1024)
        fh.write(bytes([byte[0] ^ 0xFF]))
    dom = libvirt_env.define_guest("tampered", busybox_guest, disk_path=image)
    assert "disk digest:" in denial(start_error(dom))


def test_unsigned_disk_is_refused(host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest) -> None:
    dom = libvirt_env.define_guest("unsigned", busybox_guest)
    assert "is not signed" in denial(start_error(dom))


def test_expired_manifest_is_refused(host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest) -> None:
    image = libvirt_env.copy_disk(busybox_guest.root_qcow2, "expired.qcow2")
    host.sign_custom(image, host.manifest_for(image, busybox_guest, "expired", expired=True))
    overlay = libvirt_env.overlay(image, "expired-top.qcow2")
    dom = libvirt_env.define_guest("expired", busybox_guest, disk_path=overlay)
    assert "expiry: manifest of expired v1 expired" in denial(start_error(dom))


def test_revoked_signer_is_refused(host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest) -> None:
    image = libvirt_env.copy_disk(busybox_guest.root_qcow2, "revoked.qcow2")
    host.sign_custom(image, host.manifest_for(image, busybox_guest, "revoked"), signer=host.revoked)
    dom = libvirt_env.define_guest("revoked", busybox_guest, disk_path=libvirt_env.overlay(image, "revoked-top.qcow2"))
    line = denial(start_error(dom))
    assert "revocation:" in line and "revoked-build" in line


def test_rolled_back_version_is_refused(host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest) -> None:
    v1 = host.publish(busybox_guest, "rollme", 1)
    v2 = host.publish(busybox_guest, "rollme", 2)
    newer = libvirt_env.define_guest("roll-v2", busybox_guest, disk_path=libvirt_env.overlay(v2, "v2.qcow2"))
    newer.create()
    newer.destroy()
    older = libvirt_env.define_guest("roll-v1", busybox_guest, disk_path=libvirt_env.overlay(v1, "v1.qcow2"))
    assert "rollback: rollme v1 is older than version 2" in denial(start_error(older))


def test_overlay_on_an_unsigned_base_is_refused(
    host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    base = libvirt_env.copy_disk(busybox_guest.root_qcow2, "unsigned-base.qcow2")
    dom = libvirt_env.define_guest("ov-unsigned", busybox_guest, disk_path=libvirt_env.overlay(base, "ov.qcow2"))
    assert "base image" in denial(start_error(dom)) and "is not signed" in start_error(dom)


def test_raw_image_that_looks_like_qcow2_is_refused(
    host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    # A signed raw disk whose bytes begin like qcow2: opened as raw it is fine for QEMU, but any tool that
    # probes it would see a qcow2 (and maybe its backing file): hostguard refuses the confusion outright.
    image = libvirt_env.copy_disk(busybox_guest.root_qcow2, "confused.raw")
    host.sign_custom(image, host.manifest_for(image, busybox_guest, "confused", disk_format="raw"))
    dom = libvirt_env.define_guest("confused", busybox_guest, disk_path=image, disk_format="raw")
    assert "looks like qcow2" in denial(start_error(dom))


def test_second_unsigned_disk_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    extra = libvirt_env.path("data.raw")
    extra.write_bytes(b"\x00" * 1024 * 1024)
    dom = libvirt_env.define_guest(
        "two-disks",
        busybox_guest,
        disk_path=libvirt_env.overlay(signed_base, "two.qcow2"),
        extra_disks=[Disk(extra, "raw", target="vdb")],
    )
    assert "disk vdb:" in denial(start_error(dom)) and "is not signed" in start_error(dom)


def test_a_filesystem_share_into_the_guest_is_refused(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    # Signed disks and boot files, plus a 9p share of a host directory: the guest could run anything from it.
    share = libvirt_env.path("share")
    share.mkdir()
    xml = libvirt_env.domain_xml("share", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "share.qcow2"))
    fs = f"<filesystem type='mount' accessmode='mapped'><source dir='{share}'/><target dir='hostshare'/></filesystem>"
    libvirt_env.names.append(libvirt_env.domain_name("share"))  # cleaned up with the rest
    dom = libvirt_env.connection().defineXML(xml.replace("</devices>", fs + "</devices>", 1))
    line = denial(start_error(dom))
    assert f"filesystem share {share} -> hostshare" in line and "[policy] allow_filesystems = true" in line
    record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
    assert record["verdict"] == "deny" and "filesystem share" in str(record["reason"])


def test_domain_xml_with_an_external_entity_is_refused_by_the_installed_hook(host: GuardedHost) -> None:
    xml = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]>
<domain type='qemu'><name>&x;</name><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>"""
    result = host.run_hook("evil", "prepare", "begin", "-", xml=xml)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "DOCTYPE" in err and "root:" not in err
    assert result.stdout == b""


def test_audit_mode_lets_the_tampered_image_start_and_logs_would_deny(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    image = libvirt_env.copy_disk(signed_base, "audit.qcow2")
    shutil.copyfile(str(signed_base) + ".hgsig", str(image) + ".hgsig")
    with image.open("r+b") as fh:
        fh.seek(2 * 1024 * 1024)
        fh.write(b"tampered")
    host.write_config(mode="audit")
    try:
        dom = libvirt_env.define_guest("audit", busybox_guest, disk_path=image)
        dom.create()
        assert dom.isActive()
    finally:
        host.write_config(mode="enforce")
    records = [r for r in host.audit_records() if r.get("domain") == dom.name()]
    prepare = [r for r in records if r.get("operation") == "prepare"]
    assert [r["verdict"] for r in prepare] == ["would-deny"] and "disk digest" in str(prepare[0]["reason"]), prepare
    # `start`/`started` find no pre-boot record of an unverified start: also a would-deny, never a deny.
    assert {r["verdict"] for r in records} == {"would-deny"}, records


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_migrate_and_restore_print_nothing_on_stdout(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest, operation: str
) -> None:
    good = libvirt_env.domain_xml(
        "hyg-ok", busybox_guest, disk_path=libvirt_env.overlay(signed_base, f"{operation}.qcow2")
    )
    bad = libvirt_env.domain_xml(
        "hyg-bad", busybox_guest, disk_path=libvirt_env.copy_disk(busybox_guest.root_qcow2, f"{operation}-bad.qcow2")
    )
    uuid = "<uuid>6b3c9a44-5c4e-4b61-9a43-3fb1f6a1c001</uuid>"
    ok = host.run_hook("hyg-ok", operation, "begin", "-", xml=good.replace("<memory", uuid + "<memory", 1).encode())
    denied = host.run_hook("hyg-bad", operation, "begin", "-", xml=bad.replace("<memory", uuid + "<memory", 1).encode())
    assert (ok.returncode, ok.stdout) == (0, b""), ok.stderr
    assert denied.returncode == 1 and denied.stdout == b""
    assert "is not signed" in denied.stderr.decode()


def test_save_and_restore_of_a_guarded_domain_works(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(signed_base, "saved.qcow2")
    dom = libvirt_env.boot("saved", busybox_guest, disk_path=overlay)
    saved = libvirt_env.path("saved.state")
    dom.save(str(saved))
    libvirt_env.conn.restore(str(saved))
    assert libvirt_env.conn.lookupByName(dom.name()).isActive()
    ops = [r["operation"] for r in host.audit_records() if r.get("domain") == dom.name()]
    assert "restore" in ops or ops.count("prepare") >= 2


def test_reconnect_after_libvirtd_restart_keeps_a_guarded_domain_running_even_with_a_broken_trust_store(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    overlay = libvirt_env.overlay(signed_base, "reconnect.qcow2")
    dom = libvirt_env.boot("reconnect", busybox_guest, disk_path=overlay)
    name = dom.name()
    hidden = host.trust.with_name("trust.hidden")
    host.trust.rename(hidden)
    try:
        subprocess.run(["bash", "scripts/libvirtd.sh", "restart"], check=True, cwd=Path(__file__).parents[2])
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            time.sleep(1)
            assert conn.lookupByName(name).isActive()
        finally:
            conn.close()
        # ...while a new start in that state is refused: a broken trust store never means "skip checks".
        libvirt_env.conn = libvirt.open("qemu:///system")
        fresh = libvirt_env.define_guest(
            "after-restart", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "after.qcow2")
        )
        assert "trust directory" in denial(start_error(fresh))
    finally:
        hidden.rename(host.trust)


def test_ten_domains_started_at_once_all_get_correct_verdicts(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    doms = {}
    for i in range(10):
        if i % 2 == 0:
            disk = libvirt_env.overlay(signed_base, f"many-{i}.qcow2")
        else:
            disk = libvirt_env.copy_disk(busybox_guest.root_qcow2, f"many-{i}.qcow2")
        doms[i] = libvirt_env.define_guest(f"many-{i}", busybox_guest, disk_path=disk, memory_mib=96)

    def start(i: int) -> str:
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            conn.lookupByName(doms[i].name()).create()
            return "started"
        except libvirt.libvirtError as err:
            return str(err)
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        results = dict(zip(doms, pool.map(start, doms), strict=True))
    for i, result in results.items():
        if i % 2 == 0:
            assert result == "started", f"domain {i}: {result}"
        else:
            assert "is not signed" in result, f"domain {i}: {result}"
    durations = [
        float(str(r["duration_ms"]))
        for r in host.audit_records()
        if str(r.get("domain", "")).startswith(libvirt_env.prefix + "many-")
    ]
    print(f"ten at once: slowest hook {max(durations):.0f} ms")
