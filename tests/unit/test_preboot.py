"""hostguard.preboot.decide.decide without libvirt: an in-memory configuration, real qcow2 files made by qemu-img,
a signed base image. Host inputs beyond disks are refused by default with one line naming the policy key;
encrypted, corrupt and dirty-backing qcow2 layers are refused; the parse cache changes nothing."""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostguard.cli import main
from hostguard.domain.spec import spec_from_json, spec_to_json
from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import DomainError, VerificationError
from hostguard.host.config import Config
from hostguard.host.state import StateStore
from hostguard.preboot.decide import Decision, decide
from hostguard.preboot.parsecache import parse_cache_key, parse_domain_xml_cached
from tests.testbed.pki import TestPKI
from tests.testbed.prereq import require_tool

DATA = Path(__file__).parent / "data" / "domainxml"
UUID = "6348c36c-1496-4842-9409-a25b4065a3bb"


def qemu_img(*args: str) -> None:
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"qemu-img {' '.join(args)}: {result.stderr.strip()}"


class Host:
    """A trust store, a state directory and a signed qcow2 base image (with kernel and initrd)."""

    def __init__(self, tmp: Path, pki: TestPKI, template: Path | None = None) -> None:
        require_tool("qemu-img")
        self.tmp = tmp
        self.base = tmp / "base.qcow2"
        self.kernel, self.initrd = tmp / "vmlinuz", tmp / "initrd.img"
        self.state = tmp / "state"
        if template is not None:  # a copy of a host built by this __init__ (`host_template`): the same files
            shutil.copytree(template, tmp, symlinks=True, dirs_exist_ok=True)
            self.trust = tmp / "trust"
            return
        self.trust = pki.write_trust_dir(tmp / "trust", crls=[pki.crl()])
        cert, key = pki.leaf.write(tmp / "keys", "leaf")
        chain = tmp / "keys" / "chain.pem"
        chain.write_bytes(pki.intermediate.pem)
        qemu_img("create", "-q", "-f", "qcow2", str(self.base), "16M")
        self.kernel.write_bytes(b"kernel" * 100)
        self.initrd.write_bytes(b"initrd" * 100)
        manifest = tmp / "m.json"
        create = ["manifest", "create", str(self.base), "--name", "web", "--version", "1", "--format", "qcow2"]
        create += ["--kernel", str(self.kernel), "--initrd", str(self.initrd), "--reader", "none", "--quiet"]
        assert main([*create, "-o", str(manifest)]) == 0
        sign = ["sign", str(manifest), "--key", str(key), "--cert", str(cert), "--chain", str(chain)]
        assert main([*sign, "-o", f"{self.base}.hgsig"]) == 0

    def overlay(self, name: str = "top.qcow2", *extra: str) -> Path:
        path = self.tmp / name
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base), *extra, str(path))
        return path

    def config(self, **policy: Any) -> Config:
        doc = {"trust": {"dir": str(self.trust)}, "state": {"dir": str(self.state)}, "policy": policy}
        return Config(doc, self.tmp / "hostguard.toml")

    def xml(self, disk: Path | None = None, *, devices: str = "", os_extra: str = "", extra: str = "") -> bytes:
        disk_xml = (
            ""
            if disk is None
            else f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
            "<target dev='vda' bus='virtio'/></disk>"
        )
        return (
            f"<domain type='qemu' id='3'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>128</memory>"
            f"<os><type arch='x86_64'>hvm</type><kernel>{self.kernel}</kernel><initrd>{self.initrd}</initrd>"
            f"{os_extra}</os><devices>{disk_xml}{devices}</devices>{extra}</domain>"
        ).encode()

    def decide(self, xml: bytes, **policy: Any) -> Decision:
        return decide(xml, self.config(**policy), time.time())


@pytest.fixture(scope="session")
def host_template(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Path:
    """The files of one `Host`, built once (a qcow2 base signed through the CLI, ~75 ms); each `host` is a copy."""
    d = tmp_path_factory.mktemp("preboot-host")
    Host(d, pki)
    return d


@pytest.fixture
def host(tmp_path: Path, pki: TestPKI, host_template: Path) -> Host:
    return Host(tmp_path, pki, host_template)


def denied(host: Host, xml: bytes, match: str, **policy: Any) -> str:
    with pytest.raises(VerificationError) as info:
        host.decide(xml, **policy)
    text = str(info.value)
    assert "\n" not in text and match in text, text
    return text


def test_a_signed_overlay_is_allowed_and_recorded(host: Host) -> None:
    top = host.overlay()
    decision = host.decide(host.xml(top))
    assert [o.facts.label for _, o in decision.outcomes] == ["web v1"]
    layers = decision.domain_record().disks[0].layers
    assert [(x.path, x.role) for x in layers] == [(str(top), "overlay"), (str(host.base), "signed")]


def test_the_second_start_comes_from_the_caches_and_decides_alike(host: Host) -> None:
    top = host.overlay()
    first = host.decide(host.xml(top))
    second = host.decide(host.xml(top).replace(b"id='3'", b"id='4'"))  # libvirt's next start
    assert first.domain_record() == second.domain_record()
    assert [o.cached_verdict for _, o in second.outcomes] == [True]
    assert second.disks[0].digested is not None and second.disks[0].digested.cached
    with sqlite3.connect(host.state / "state.db") as db:
        assert db.execute("SELECT count(*) FROM parsed").fetchone()[0] == 1


# --- host inputs beyond disks -------------------------------------------------------------------------------

VIRTIOFS = (
    "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
    "<source dir='/srv/share'/><target dir='share'/></filesystem>"
)
NINEP = (
    "<filesystem type='mount' accessmode='mapped'><source dir='/srv/9p'/><target dir='tag9p'/><readonly/></filesystem>"
)
HOSTDEV = (
    "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
    "<address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/></source></hostdev>"
)
REDIRDEV = "<redirdev bus='usb' type='spicevmc'/>"
ACPI = "<acpi><table type='slic'>/var/lib/acpi/slic.dat</table></acpi>"
ROM = "<interface type='user'><model type='virtio'/><rom file='/tmp/evil.rom'/></interface>"
FWCFG = "<sysinfo type='fwcfg'><entry name='opt/com.coreos/config' file='/srv/ignition.json'/></sysinfo>"
NVDIMM = (
    "<memory model='nvdimm'><source><path>/srv/pmem.img</path></source>"
    "<target><size unit='MiB'>64</size><node>0</node></target></memory>"
)


@pytest.mark.parametrize(
    ("kind", "match", "key"),
    [
        ({"devices": VIRTIOFS}, "filesystem share /srv/share -> share (virtiofs)", "allow_filesystems"),
        ({"devices": NINEP}, "filesystem share /srv/9p -> tag9p (mount)", "allow_filesystems"),
        ({"devices": HOSTDEV}, "host device passthrough (pci)", "allow_hostdev"),
        ({"devices": REDIRDEV}, "USB redirection (spicevmc)", "allow_hostdev"),
        ({"os_extra": ACPI}, "ACPI table /var/lib/acpi/slic.dat (slic)", "allow_acpi_tables"),
        ({"extra": FWCFG}, "fw_cfg entry opt/com.coreos/config (file /srv/ignition.json)", "allow_fwcfg"),
    ],
)
def test_host_inputs_are_refused_by_default_and_allowed_by_their_key(
    host: Host, kind: dict[str, str], match: str, key: str
) -> None:
    top = host.overlay()
    text = denied(host, host.xml(top, **kind), match)
    assert f"[policy] {key} = true" in text
    assert host.decide(host.xml(top, **kind), **{key: True}).outcomes  # the disks are still verified


@pytest.mark.parametrize(
    ("os_extra", "devices", "match"),
    [
        ("<loader readonly='yes' type='pflash'>/tmp/OVMF_CODE.fd</loader>", "", "firmware /tmp/OVMF_CODE.fd is not"),
        (
            "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
            "<nvram template='/tmp/VARS.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
            "",
            "nvram template /tmp/VARS.fd is not",
        ),
        ("", ROM, "option ROM /tmp/evil.rom of interface #0 is not"),
        ("<loader type='rom'>/usr/share/OVMF/../../../tmp/x.fd</loader>", "", "firmware /usr/share/OVMF/../../../tmp"),
    ],
)
def test_firmware_and_option_roms_must_come_from_the_firmware_directories(
    host: Host, os_extra: str, devices: str, match: str
) -> None:
    top = host.overlay()
    assert "[policy] firmware_dirs" in denied(host, host.xml(top, os_extra=os_extra, devices=devices), match)


def test_distribution_firmware_and_a_configured_directory_are_allowed(host: Host, tmp_path: Path) -> None:
    top = host.overlay()
    ovmf = "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
    assert host.decide(host.xml(top, os_extra=ovmf)).outcomes
    roms = tmp_path / "roms"
    roms.mkdir()
    rom = f"<interface type='user'><rom file='{roms}/pxe.rom'/></interface>"
    denied(host, host.xml(top, devices=rom), "option ROM")
    assert host.decide(host.xml(top, devices=rom), firmware_dirs=[str(roms)]).outcomes


def test_a_symlink_out_of_a_firmware_directory_is_followed(host: Host, tmp_path: Path) -> None:
    fw = tmp_path / "fw"
    fw.mkdir()
    (fw / "OVMF_CODE.fd").symlink_to(tmp_path / "elsewhere.fd")
    top = host.overlay()
    xml = host.xml(top, os_extra=f"<loader type='pflash'>{fw}/OVMF_CODE.fd</loader>")
    denied(host, xml, "is not in a firmware directory", firmware_dirs=[str(fw)])


def test_file_backed_memory_devices_are_refused(host: Host) -> None:
    denied(host, host.xml(host.overlay(), devices=NVDIMM), "nvdimm #0 memory device is backed by host file")


@pytest.mark.parametrize(
    "cdrom",
    [
        "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>",
        "<disk type='block' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>",
    ],
)
def test_an_empty_cdrom_drive_is_allowed(host: Host, cdrom: str) -> None:
    decision = host.decide(host.xml(host.overlay(), devices=cdrom))
    assert any("disk sda (cdrom" in note for note in decision.notes)


def test_a_cdrom_with_media_is_refused(host: Host) -> None:
    cdrom = "<disk type='file' device='cdrom'><source file='/srv/x.iso'/><target dev='sda' bus='sata'/></disk>"
    denied(host, host.xml(host.overlay(), devices=cdrom), "cdrom media are not allowed")


# --- qcow2 layers the decision refuses ----------------------------------------------------------------------


def set_incompatible_bit(path: Path, bit: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(72)
        (value,) = struct.unpack(">Q", fh.read(8))
        fh.seek(72)
        fh.write(struct.pack(">Q", value | (1 << bit)))


def luks_overlay(host: Host) -> Path:
    top = host.tmp / "luks.qcow2"
    secret = ["--object", "secret,id=sec0,data=hunter2"]
    luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *secret, "-o", luks, "-F", "qcow2", "-b", str(host.base)]
    for _ in range(5):  # qemu-img's PBKDF timing sometimes fails on this VM: "Unable to get accurate CPU usage"
        result = subprocess.run([*argv, str(top)], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return top
        assert "accurate CPU usage" in result.stderr, result.stderr
    pytest.fail(f"qemu-img could not create a LUKS overlay: {result.stderr.strip()}")


def aes_overlay(host: Host) -> Path:
    """An overlay whose header says legacy AES (crypt_method 1), which QEMU no longer creates."""
    top = host.overlay("aes.qcow2")
    with top.open("r+b") as fh:
        fh.seek(32)
        fh.write(struct.pack(">I", 1))
    return top


@pytest.mark.parametrize(("make", "method"), [(luks_overlay, "luks"), (aes_overlay, "aes")])
def test_an_encrypted_overlay_is_refused(host: Host, make: Callable[[Host], Path], method: str) -> None:
    denied(host, host.xml(make(host)), f"is encrypted ({method}): hostguard cannot inspect it")


def test_a_corrupt_overlay_is_refused(host: Host) -> None:
    top = host.overlay()
    set_incompatible_bit(top, 1)
    denied(host, host.xml(top), "corrupt: check it with `qemu-img check -r all`")


def test_a_dirty_backing_file_is_refused_but_a_dirty_top_overlay_is_not(host: Host) -> None:
    top = host.overlay()
    set_incompatible_bit(top, 0)  # after a host crash: QEMU repairs it on open
    assert host.decide(host.xml(top)).outcomes
    set_incompatible_bit(host.base, 0)
    denied(host, host.xml(top), f"backing file {host.base} is marked dirty")


# --- the parse cache ----------------------------------------------------------------------------------------


def sample_xml(host: Host) -> list[bytes]:
    top = host.overlay()
    samples = [p.read_bytes() for p in sorted(DATA.glob("*.xml"))]
    samples.append(host.xml(top))
    for devices, os_extra, extra in [
        (VIRTIOFS + NINEP + HOSTDEV + REDIRDEV + ROM + NVDIMM, ACPI, FWCFG),
        ("<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>", "", ""),
    ]:
        samples.append(host.xml(top, devices=devices, os_extra=os_extra, extra=extra))
    return samples


def test_the_spec_json_round_trip_is_exact(host: Host) -> None:
    for xml in sample_xml(host):
        spec = parse_domain_xml(xml)
        back = spec_from_json(spec_to_json(spec))
        assert back == spec and repr(back) == repr(spec)  # repr: the record types too


def test_cached_parses_equal_fresh_parses_and_refusals_are_not_cached(host: Host) -> None:
    with StateStore(host.state) as state:
        for xml in sample_xml(host):
            fresh = parse_domain_xml(xml)
            assert parse_domain_xml_cached(xml, state) == fresh  # stored
            assert parse_domain_xml_cached(xml, state) == fresh  # served
        stored = state._run("SELECT count(*) FROM parsed")[0][0]
        with pytest.raises(DomainError, match="DOCTYPE"):
            parse_domain_xml_cached(b"<!DOCTYPE domain>" + host.xml(None), state)
        with pytest.raises(DomainError, match="not well-formed"):
            parse_domain_xml_cached(host.xml(None).replace(b"id='3'", b"id='3' id='4'"), state)
        assert state._run("SELECT count(*) FROM parsed")[0][0] == stored


def test_only_libvirt_s_live_id_is_left_out_of_the_key(host: Host) -> None:
    xml = host.xml(None)
    assert parse_cache_key(xml) == parse_cache_key(xml.replace(b"id='3'", b"id='17'"))
    assert parse_cache_key(xml) == parse_cache_key(xml.replace(b" id='3'", b""))
    for variant in (
        xml.replace(b"id='3'", b"id='3' id='4'"),  # a duplicate attribute: not well-formed, keyed apart
        xml.replace(b"id='3'", b'id="3"'),
        xml.replace(b"<name>web1</name>", b"<name>web2</name>"),
    ):
        assert parse_cache_key(variant) != parse_cache_key(xml)


def test_a_corrupt_cache_entry_is_parsed_again(host: Host) -> None:
    xml = host.xml(None)
    with StateStore(host.state) as state:
        parse_domain_xml_cached(xml, state)
        key = parse_cache_key(xml)
        assert key is not None
        state._run('UPDATE parsed SET result = \'{"": "DomainSpec"}\' WHERE key = ?', (key,))
        assert parse_domain_xml_cached(xml, state) == parse_domain_xml(xml)


# --- re-warming the digest cache at `release end` -----------------------------------------------------------


def relabel(*paths: Path) -> None:
    """What libvirt's dynamic ownership does at start and stop: a chown, so a new ctime (same content)."""
    time.sleep(0.01)
    for path in paths:
        st = path.stat()
        os.chown(path, st.st_uid, st.st_gid)


def boot_cached(decision: Decision) -> list[bool]:
    return [d.cached for d in decision.boot_files()]


def test_release_end_rewarms_the_digests_libvirt_s_relabelling_invalidated(host: Host) -> None:
    from hostguard.host.statedir import save_domain_record
    from hostguard.preboot.decide import rewarm_digests

    xml = host.xml(host.overlay())
    config = host.config()
    save_domain_record(host.state, host.decide(xml).domain_record())
    assert boot_cached(host.decide(xml)) == [True, True]
    relabel(host.kernel, host.initrd, host.base)
    assert boot_cached(host.decide(xml)) == [False, False]  # the cache rightly distrusts a new ctime
    relabel(host.kernel, host.initrd, host.base)
    assert rewarm_digests(config, xml) == 3  # base, kernel, initrd
    decision = host.decide(xml)
    assert boot_cached(decision) == [True, True]
    assert decision.disks[0].digested is not None and decision.disks[0].digested.cached


def test_a_kernel_changed_during_the_run_fails_the_next_start_despite_the_rewarm(host: Host) -> None:
    from hostguard.host.statedir import save_domain_record
    from hostguard.preboot.decide import rewarm_digests

    xml = host.xml(host.overlay())
    save_domain_record(host.state, host.decide(xml).domain_record())
    host.kernel.write_bytes(b"evil" * 150)
    assert rewarm_digests(host.config(), xml) == 3
    denied(host, xml, "kernel does not match the signed kernel of web v1")


def test_rewarm_skips_files_that_are_not_the_recorded_ones(host: Host) -> None:
    from hostguard.host.statedir import save_domain_record
    from hostguard.preboot.decide import rewarm_digests

    xml = host.xml(host.overlay())
    save_domain_record(host.state, host.decide(xml).domain_record())
    replacement = host.tmp / "other-kernel"
    replacement.write_bytes(host.kernel.read_bytes())
    replacement.rename(host.kernel)  # same content, another inode
    assert rewarm_digests(host.config(), xml) == 2
    assert rewarm_digests(host.config(), host.xml(None).replace(UUID.encode(), b"0" * 8 + UUID[8:].encode())) == 0
