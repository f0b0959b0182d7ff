"""Overlays with content are checked before boot (issue 14): hostguard.preboot.decide over a real signed ext4
base and qcow2 overlays written by QEMU's own qemu-io, as a host that tampered with a stopped domain's overlay
leaves them. A fresh overlay costs no filesystem read; a finding denies in one line unless the `[findings]`
policy allows the path or only logs the kind."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from hostguard.cli import main
from hostguard.errors import VerificationError
from hostguard.host.config import Config
from hostguard.imagefs import overlayview
from hostguard.preboot.decide import Decision, decide
from hostguard.preboot.overlays import overlays_written
from tests.testbed.pki import TestPKI
from tests.unit.diskcheck_images import BaseImage, make_base, overlay_with
from tests.unit.inventory_images import require_tools, run

UUID = "0b8e2f1c-58a4-4d55-8f1e-2c7f3f4a9b10"


class Host:
    def __init__(self, tmp: Path, pki: TestPKI, base: BaseImage, *, reader: str = "fast") -> None:
        self.tmp = tmp
        self.trust = pki.write_trust_dir(tmp / "trust", crls=[pki.crl()])
        cert, key = pki.leaf.write(tmp / "keys", "leaf")
        chain = tmp / "keys" / "chain.pem"
        chain.write_bytes(pki.intermediate.pem)
        self.state = tmp / "state"
        self.base = base
        self.image = tmp / "base.qcow2"
        shutil.copyfile(base.qcow2, self.image)
        manifest = tmp / "m.json"
        create = ["manifest", "create", str(self.image), "--name", "web", "--version", "1", "--format", "qcow2"]
        assert main([*create, "--reader", reader, "--quiet", "-o", str(manifest)]) == 0
        sign = ["sign", str(manifest), "--key", str(key), "--cert", str(cert), "--chain", str(chain)]
        assert main([*sign, "-o", f"{self.image}.hgsig"]) == 0

    def overlay(self, name: str, commands: list[str] | None = None) -> Path:
        out = self.tmp / f"{name}.qcow2"
        if commands is None:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.image, out)
            return out
        return overlay_with(self.image, self.base.raw, self.base.changed(name, commands), out)

    def xml(self, disk: Path) -> bytes:
        return (
            f"<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>128</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>"
        ).encode()

    def config(self, findings: dict[str, Any] | None = None) -> Config:
        doc = {"trust": {"dir": str(self.trust)}, "state": {"dir": str(self.state)}, "findings": findings or {}}
        return Config(doc, self.tmp / "hostguard.toml")

    def decide(self, disk: Path, findings: dict[str, Any] | None = None) -> Decision:
        return decide(self.xml(disk), self.config(findings), time.time())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseImage:
    require_tools()
    return make_base(tmp_path_factory.mktemp("preboot-overlay-base"))


@pytest.fixture
def host(tmp_path: Path, pki: TestPKI, base: BaseImage) -> Host:
    overlayview._memo.items.clear()
    return Host(tmp_path, pki, base)


def planted(host: Host, name: str) -> Path:
    """An overlay into which an executable was written on the host while the domain was off."""
    shutil.copyfile("/usr/bin/true", host.tmp / "evil")
    return host.overlay(name, [f"write {host.tmp}/evil /usr/bin/evil", "sif /usr/bin/evil mode 0100755"])


def denied(host: Host, disk: Path, **kw: Any) -> str:
    with pytest.raises(VerificationError) as info:
        host.decide(disk, **kw)
    text = str(info.value)
    assert "\n" not in text, text
    return text


def test_an_executable_planted_in_a_stopped_domain_s_overlay_is_denied_before_boot(host: Host) -> None:
    text = denied(host, planted(host, "evil"))
    assert "disk vda: the overlay content differs from web v1: 1 finding(s): " in text
    assert "unexpected-executable /usr/bin/evil" in text
    assert "[findings.allow]" in text


def test_a_setuid_bit_set_on_the_host_in_an_overlay_is_denied_before_boot(host: Host) -> None:
    text = denied(host, host.overlay("suid", ["sif /bin/busybox mode 0104755"]))
    assert "changed-executable /bin/busybox: expected mode=0o755, found mode=0o4755" in text


def test_a_fresh_overlay_reads_no_filesystem_and_is_allowed(host: Host) -> None:
    top = host.overlay("fresh")
    decision = host.decide(top)
    assert not decision.disks[0].written and not any("overlay content" in n for n in decision.notes)
    assert not (host.state / "disk-index").exists()  # the base was never indexed: nothing was read


def test_an_overlay_written_with_the_signed_content_is_allowed_with_a_note(host: Host) -> None:
    top = host.overlay("same", ["set_inode_field /etc/fstab mtime 20200101"])  # no executable changes
    decision = host.decide(top)
    assert decision.disks[0].written
    (note,) = [n for n in decision.notes if "overlay content checked before boot" in n]
    assert "incremental" in note and "index built" in note
    again = host.decide(top)  # the next start reads the cached index
    assert any("index cached" in n for n in again.notes)


def test_a_path_the_admin_allows_to_change_is_not_denied(host: Host) -> None:
    decision = host.decide(planted(host, "allowed"), {"allow": {"unexpected-executable": ["/usr/bin/*"]}})
    assert any("overlay content checked before boot" in n for n in decision.notes)


def test_a_kind_the_admin_only_logs_is_noted_not_denied(host: Host) -> None:
    decision = host.decide(planted(host, "logged"), {"action": {"unexpected-executable": "log"}})
    assert any("logged by policy: unexpected-executable /usr/bin/evil" in n for n in decision.notes)


def test_a_manifest_without_files_leaves_the_check_unavailable_and_logged_by_default(
    tmp_path: Path, pki: TestPKI, base: BaseImage
) -> None:
    host = Host(tmp_path, pki, base, reader="none")
    top = planted(host, "nofiles")
    decision = host.decide(top)
    assert any("not checked: web v1: the manifest lists no files" in n for n in decision.notes)
    text = denied(host, top, findings={"action": {"check-unavailable": "pause"}})
    assert "check-unavailable vda" in text


def test_overlays_written_sees_one_allocated_cluster_and_a_size_change(host: Host) -> None:
    def written(top: Path) -> bool:
        fds = [os.open(p, os.O_RDONLY) for p in (top, host.image)]
        try:
            return overlays_written([(top, "qcow2", fds[0]), (host.image, "qcow2", fds[1])])
        finally:
            for fd in fds:
                os.close(fd)

    fresh = host.overlay("w-fresh")
    assert not written(fresh)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -z 1M 4k", fresh)  # a zero cluster is content too
    assert written(fresh)
    bigger = host.tmp / "w-big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", host.image, bigger, "1G")
    assert written(bigger)
