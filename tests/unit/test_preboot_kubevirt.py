"""KubeVirt's layout through the hook's decision (issue 15 item 7): a containerDisk base found by its digest (no
sidecar), virt-launcher's overlay with the chain spelled out in `<backingStore>` (agreeing with the qcow2 header or
refused with one line), and the cloud-init NoCloud seed (ISO 9660 or vfat labelled cidata) under
`[policy] profile = "kubevirt"`. The same on the real libvirtd: tests/integration/test_stacks_kubevirt.py."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from hostguard.host.config import Config
from hostguard.preboot.decide import Decision, decide
from tests.testbed.pki import TestPKI
from tests.testbed.prereq import require_tool
from tests.unit.test_preboot import qemu_img
from tests.unit.test_preboot_stacks import Nova, config_drive, refused, run

VMI = "default_testvmi"  # <namespace>_<vmi name>
UUID = "5a9fc181-957e-5c32-9e5a-2de5e9673531"


def nocloud_vfat(path: Path, label: str = "cidata") -> None:
    require_tool("mkfs.vfat")
    run("truncate", "-s", "2M", str(path))
    run("mkfs.vfat", "-n", label, str(path))


def nocloud_iso(path: Path, label: str = "cidata") -> None:
    config_drive(path, label)


class KubeVirt:
    """virt-launcher's files: the containerDisk `disk_0.img` (the signed qcow2 as the container image holds it, or
    its raw conversion), `disk.qcow2` above it, the NoCloud seed, the envelope only in an index by digest."""

    def __init__(self, tmp: Path, pki: TestPKI, *, raw_base: bool = False) -> None:
        self.nova = Nova(tmp, pki)  # the signed image and the trust store
        self.root = tmp / "run"
        self.base = self.root / "kubevirt" / "container-disks" / "disk_0.img"
        self.base.parent.mkdir(parents=True)
        self.base_format = "raw" if raw_base else "qcow2"
        if raw_base:
            qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(self.nova.published), str(self.base))
        else:
            shutil.copyfile(self.nova.published, self.base)
        self.index = tmp / "index"
        self.index.mkdir()
        digest = hashlib.sha256(self.base.read_bytes()).hexdigest()
        self.nova.envelope.rename(self.index / f"{digest}.hgsig")
        self.overlay = self.root / "kubevirt-ephemeral-disks" / "disk-data" / "containerdisk" / "disk.qcow2"
        self.overlay.parent.mkdir(parents=True)
        qemu_img(
            "create", "-q", "-f", "qcow2", "-o", f"backing_file={self.base},backing_fmt={self.base_format}",
            str(self.overlay),
        )  # fmt: skip
        self.seed = self.root / "kubevirt-ephemeral-disks" / "cloud-init-data" / "default" / "testvmi" / "noCloud.iso"
        self.seed.parent.mkdir(parents=True)

    def xml(self, *, backing: str | None = None, seed: bool = True, seed_first: bool = False) -> bytes:
        """virt-launcher's shape: the overlay with its chain given, the seed as a raw virtio disk."""
        backing = backing or (
            f"<backingStore type='file'><format type='{self.base_format}'/><source file='{self.base}'/></backingStore>"
        )
        root = (
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' error_policy='stop' "
            f"discard='unmap'/><source file='{self.overlay}'/>{backing}<target dev='vda' bus='virtio'/>"
            "<alias name='ua-containerdisk'/></disk>"
        )
        seed_xml = (
            "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none' error_policy='stop' "
            f"discard='unmap'/><source file='{self.seed}'/><target dev='vdb' bus='virtio'/>"
            "<alias name='ua-cloudinitdisk'/></disk>"
        )
        disks = (seed_xml + root if seed_first else root + seed_xml) if seed else root
        return (
            f"<domain type='qemu'><name>{VMI}</name><uuid>{UUID}</uuid><memory unit='KiB'>131072</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>"
            f"<devices>{disks}</devices></domain>"
        ).encode()

    def decide(self, xml: bytes | None = None, **policy: Any) -> Decision:
        doc = {
            "trust": {"dir": str(self.nova.trust)},
            "state": {"dir": str(self.nova.state)},
            "policy": {"envelope_index_dirs": [str(self.index)], **policy},
        }
        return decide(xml or self.xml(), Config(doc, self.nova.tmp / "hostguard.toml"), time.time())

    def denied(self, match: str, xml: bytes | None = None, **policy: Any) -> str:
        return refused(lambda: self.decide(xml, **policy), match)


@pytest.fixture
def kv(tmp_path: Path, pki: TestPKI) -> KubeVirt:
    return KubeVirt(tmp_path, pki)


def test_a_container_disk_with_an_agreeing_backing_store_is_found_by_digest_and_allowed(kv: KubeVirt) -> None:
    nocloud_iso(kv.seed)
    decision = kv.decide(profile="kubevirt")
    assert [o.facts.label for _, o in decision.outcomes] == ["web v1"]
    assert [env.parent for env, _ in decision.outcomes] == [kv.index]
    digest = hashlib.sha256(kv.seed.read_bytes()).hexdigest()
    notes = decision.summary()["notes"]
    assert any(n.startswith(f"disk vdb: KubeVirt NoCloud seed {kv.seed} (sha256 {digest})") for n in notes), notes
    assert any('profile = "kubevirt"' in n for n in notes)


def test_a_raw_container_disk_verifies_by_its_guest_visible_content(tmp_path: Path, pki: TestPKI) -> None:
    kv = KubeVirt(tmp_path, pki, raw_base=True)
    kv.decide(kv.xml(seed=False))


def test_a_backing_store_naming_another_file_than_the_header_is_refused(kv: KubeVirt) -> None:
    other = kv.base.with_name("disk_1.img")
    shutil.copyfile(kv.base, other)  # even the same signed bytes: libvirt would open what the XML says
    lie = f"<backingStore type='file'><format type='qcow2'/><source file='{other}'/></backingStore>"
    kv.denied(f"<backingStore> #1 names file {other}", kv.xml(backing=lie, seed=False))


def test_a_backing_store_naming_another_format_than_the_header_is_refused(kv: KubeVirt) -> None:
    lie = f"<backingStore type='file'><format type='raw'/><source file='{kv.base}'/></backingStore>"
    kv.denied("<backingStore> #1", kv.xml(backing=lie, seed=False))


def test_a_vfat_nocloud_seed_is_allowed_under_the_kubevirt_profile(kv: KubeVirt) -> None:
    nocloud_vfat(kv.seed)
    notes = kv.decide(profile="kubevirt").summary()["notes"]
    assert any("disk vdb: KubeVirt NoCloud seed" in n for n in notes), notes


def test_without_the_profile_the_seed_is_an_unsigned_disk(kv: KubeVirt) -> None:
    nocloud_vfat(kv.seed)
    kv.denied(f"disk vdb: image {kv.seed} is not signed")


@pytest.mark.parametrize("make", [nocloud_vfat, nocloud_iso])
def test_a_seed_with_another_label_is_refused(kv: KubeVirt, make: Any) -> None:
    make(kv.seed, "config-2")
    kv.denied("is not a KubeVirt NoCloud seed: its volume label is 'config-2', not 'cidata'", profile="kubevirt")


def test_an_ephemeral_filesystem_is_not_a_nocloud_seed(kv: KubeVirt) -> None:
    require_tool("mkfs.ext4")
    run("truncate", "-s", "16M", str(kv.seed))
    run("mkfs.ext4", "-q", "-F", "-L", "cidata", str(kv.seed))
    kv.denied("is not a KubeVirt NoCloud seed", profile="kubevirt")


def test_a_seed_ahead_of_the_signed_disk_is_refused(kv: KubeVirt) -> None:
    nocloud_vfat(kv.seed)
    kv.denied("would boot first", kv.xml(seed_first=True), profile="kubevirt")


def test_a_seed_with_a_backing_file_is_refused(kv: KubeVirt) -> None:
    nocloud_vfat(kv.seed)
    real = kv.seed.with_name("seed.raw")
    kv.seed.rename(real)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"backing_file={real},backing_fmt=raw", str(kv.seed))
    xml = kv.xml().replace(b"type='raw' cache", b"type='qcow2' cache")
    kv.denied("a NoCloud seed is one raw file", xml, profile="kubevirt")


def test_nova_s_vfat_config_drive_is_allowed_under_the_nova_profile(tmp_path: Path, pki: TestPKI) -> None:
    from tests.unit.test_preboot_stacks import FullNova

    full = FullNova(Nova(tmp_path, pki))
    full.config.unlink()
    nocloud_vfat(full.config, "config-2")  # config_drive_format = vfat
    notes = full.decide(profile="nova").summary()["notes"]
    assert any(n.startswith("disk hda: Nova config drive") for n in notes), notes
    full.config.unlink()
    nocloud_vfat(full.config, "cidata")
    full.denied("its volume label is 'cidata', not 'config-2'", profile="nova")
