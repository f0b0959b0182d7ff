"""The disk-content stage on host-made disks (issue 15 item 4): Nova's ephemeral disk (a fresh ext4 `_base` under
a qcow2 overlay, as Nova makes it), swap and config drive, read from real images with a fake domain. Executables on
the ephemeral disk are findings; swap and the config drive are notes, never findings."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from hostguard.domain.record import DomainRecord, RecordedHostMade
from hostguard.host.config import load_config
from hostguard.poststart.check import check_domain
from hostguard.poststart.context import CheckContext
from hostguard.poststart.disk_stage import stage_disk_content
from hostguard.signed.findings import CHECK_UNAVAILABLE, HOST_MADE_EXECUTABLE, UNVERIFIED_OPEN, Finding
from tests.testbed.prereq import require_module
from tests.unit.diskcheck_images import debugfs, diff_ranges, qemu_io_write
from tests.unit.inventory_images import require_tools, run
from tests.unit.libvirt_fakes import FakeDomain
from tests.unit.test_preboot_kubevirt import nocloud_vfat
from tests.unit.test_preboot_stacks import config_drive

libvirt = require_module("libvirt")


class Nova:
    """An instance directory: `_base/ephemeral_1_…` (16 MiB, mkfs.ext4), `disk.eph0` over it, a swap base under
    `disk.swap`, and `disk.config`."""

    def __init__(self, tmp: Path, findings: str = "") -> None:
        require_tools()
        self.tmp = tmp
        self.base = tmp / "_base" / "ephemeral_1_0706d66"
        self.base.parent.mkdir()
        run("truncate", "-s", "16M", self.base)
        run("mkfs.ext4", "-q", "-F", "-L", "ephemeral0", self.base)
        self.eph = self.overlay(self.base, "disk.eph0")
        self.swap_base = tmp / "_base" / "swap_16"
        run("truncate", "-s", "16M", self.swap_base)
        run("mkswap", "-q", self.swap_base)
        self.swap = self.overlay(self.swap_base, "disk.swap")
        self.config = tmp / "disk.config"
        config_drive(self.config)
        self.config_path = tmp / "hostguard.toml"
        self.config_path.write_text(f'[trust]\ndir = "{tmp / "trust"}"\n[state]\ndir = "{tmp / "state"}"\n'
                                    f'[audit]\nlog = "{tmp / "audit.jsonl"}"\nsyslog = false\n{findings}')  # fmt: skip

    def overlay(self, base: Path, name: str, target_raw: Path | None = None) -> Path:
        """A qcow2 overlay on a raw base, as Nova makes it; with `target_raw`, holding its differences, written
        by qemu-io."""
        out = self.tmp / name
        out.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, out)
        if target_raw is not None:
            data = target_raw.read_bytes()
            qemu_io_write(out, "qcow2", data, diff_ranges(base.read_bytes(), data, 4096), self.tmp)
        return out

    def write_executables(self, commands: list[str]) -> None:
        """disk.eph0 again, its overlay holding what debugfs `commands` did to the fresh filesystem."""
        changed = self.tmp / "eph-changed.raw"
        shutil.copyfile(self.base, changed)
        debugfs(changed, commands)
        self.eph = self.overlay(self.base, "disk.eph0", changed)

    def record(self, dom: FakeDomain, *, config: Path | None = None) -> DomainRecord:
        def made(target: str, kind: str, path: Path) -> RecordedHostMade:
            st = os.stat(path)
            return RecordedHostMade(target, kind, str(path), st.st_dev, st.st_ino)

        host_made = (
            made("vdb", "Nova ephemeral base", self.eph),
            made("vdb", "Nova ephemeral base", self.base),
            made("vdc", "Nova swap base", self.swap),
            made("vdc", "Nova swap base", self.swap_base),
            made("hda", "Nova config drive", config or self.config),
        )
        return DomainRecord(name=dom.name(), uuid=dom.uuid, host_made=host_made)

    def run_stage(self, dom: FakeDomain, **kw: Path) -> tuple[list[Finding], CheckContext]:
        config = load_config(self.config_path)
        ctx = CheckContext(config, dom, dom.name(), dom.uuid, b"", record=self.record(dom, **kw))
        return stage_disk_content(ctx), ctx


EXECUTABLES = [
    "mkdir bin",
    "write /bin/true bin/x",
    "sif bin/x mode 0100755",
    "mkdir opt",
    "write /etc/hostname opt/tool",
    "sif opt/tool mode 0104644",  # setuid, no x bit: an executable component all the same
    "write /etc/hostname notes.txt",
    "sif notes.txt mode 0100644",  # data: no finding
]


def test_a_fresh_ephemeral_disk_has_no_finding_and_swap_and_the_config_drive_are_noted_not_read(
    tmp_path: Path,
) -> None:
    nova = Nova(tmp_path)
    dom = FakeDomain()
    started = time.monotonic()
    findings, ctx = nova.run_stage(dom)
    elapsed = time.monotonic() - started
    assert findings == []
    assert dom.calls == ["suspend", "resume"]
    made = {d["target"]: d for d in ctx.extra["disk-content"]["host_made"]}
    assert made["vdb"]["read"] is True and made["vdb"]["executables"] == 0
    assert made["vdc"]["read"] is False and made["hda"]["read"] is False
    notes = {n.path: n.found or "" for n in ctx.notes}
    assert set(notes) == {"vdc", "hda"} and all(n.kind == CHECK_UNAVAILABLE for n in ctx.notes)
    assert notes["vdc"] == "vdc (Nova swap base) not read: a swap area holds no files"
    assert notes["hda"].startswith("hda (Nova config drive) not read: ") and "fast reader" in notes["hda"]
    vdb, stage_ms = made["vdb"], ctx.extra["disk-content"]["host_made_ms"]
    print(
        f"\nfresh 16 MiB ext4 ephemeral + swap + config drive: stage {elapsed * 1000:.1f} ms, host-made part "
        f"{stage_ms:.1f} ms (vdb {vdb['ms']} ms, {vdb['walked_nodes']} entries walked; vdc {made['vdc']['ms']} ms; "
        f"hda {made['hda']['ms']} ms)"
    )


def test_executables_written_into_the_ephemeral_overlay_are_findings_at_the_disks_target(tmp_path: Path) -> None:
    nova = Nova(tmp_path)
    nova.write_executables(EXECUTABLES)
    findings, _ = nova.run_stage(FakeDomain())
    assert [(f.kind, f.path) for f in findings] == [
        (HOST_MADE_EXECUTABLE, "vdb:/bin/x"),
        (HOST_MADE_EXECUTABLE, "vdb:/opt/tool"),
    ]
    assert "mode=0o755" in (findings[0].found or "") and "mode=0o4644" in (findings[1].found or "")
    assert (findings[0].found or "").startswith("sha256=")


def test_the_findings_policy_applies_to_them_as_to_any_finding(tmp_path: Path) -> None:
    allow = '[findings.allow]\nexecutable-on-host-made-disk = ["vdb:/opt/*"]\n'
    nova = Nova(tmp_path, allow + '[findings.action]\nexecutable-on-host-made-disk = "log"\n')
    nova.write_executables(EXECUTABLES)
    dom = FakeDomain()
    record = nova.record(dom)

    def with_record(ctx: CheckContext) -> list[Finding]:
        ctx.record = record
        return []

    stages = (("record", with_record), ("disk-content", stage_disk_content))
    verdict = check_domain(load_config(nova.config_path), dom, "test", stages)
    assert verdict.status == "fail" and verdict.action == "log"
    assert [f.path for f in verdict.findings] == ["vdb:/bin/x"]  # vdb:/opt/tool allowed by its glob
    assert "not checked: vdc (Nova swap base) not read" in verdict.reason
    assert {n.path for n in verdict.notes} == {"vdc", "hda"}
    # All allowed: a pass, the notes still say what was not read.
    nova.config_path.write_text(nova.config_path.read_text().replace('["vdb:/opt/*"]', '["vdb:/*"]'))
    verdict = check_domain(load_config(nova.config_path), FakeDomain(uuid=dom.uuid), "test", stages)
    assert verdict.status == "pass" and verdict.findings == () and len(verdict.notes) == 2


def test_a_vfat_config_drive_is_noted_not_read(tmp_path: Path) -> None:
    nova = Nova(tmp_path)
    vfat = tmp_path / "disk.config.vfat"
    nocloud_vfat(vfat, "config-2")
    findings, ctx = nova.run_stage(FakeDomain(), config=vfat)
    assert findings == []
    hda = next(n.found or "" for n in ctx.notes if n.path == "hda")
    assert hda.startswith("hda (Nova config drive) not read: ") and "vfat" in hda.lower(), hda


def test_a_filesystem_made_on_the_swap_disk_is_read(tmp_path: Path) -> None:
    """Swap is noted only while it is swap: a guest that made a filesystem there and put a program on it is found."""
    nova = Nova(tmp_path)
    fs = tmp_path / "swap-as-ext4.raw"
    run("truncate", "-s", "16M", fs)
    run("mkfs.ext4", "-q", "-F", fs)
    debugfs(fs, ["write /bin/true x", "sif x mode 0100755"])
    nova.swap = nova.overlay(nova.swap_base, "disk.swap", fs)
    findings, ctx = nova.run_stage(FakeDomain())
    assert [(f.kind, f.path) for f in findings] == [(HOST_MADE_EXECUTABLE, "vdc:/x")]
    assert {n.path for n in ctx.notes} == {"hda"}


def test_an_ephemeral_overlay_swapped_after_pre_boot_is_unverified(tmp_path: Path) -> None:
    nova = Nova(tmp_path)
    dom = FakeDomain()
    record = nova.record(dom)
    os.replace(nova.overlay(nova.base, "other.qcow2"), nova.eph)  # same path, another file
    ctx = CheckContext(load_config(nova.config_path), dom, dom.name(), dom.uuid, b"", record=record)
    findings = stage_disk_content(ctx)
    assert [(f.kind, f.path) for f in findings] == [(UNVERIFIED_OPEN, "vdb")]
    assert "not the file the pre-boot check verified" in (findings[0].found or "")


def test_an_ephemeral_disk_the_reader_cannot_read_is_a_finding_not_a_note(tmp_path: Path) -> None:
    """A guest that reformats its ephemeral disk as something the fast reader does not know must not hide its
    executables that way: the disk is `check-unavailable` (policy decides), unlike swap or the config drive."""
    from hostguard.imagefs.chain import LayerRecord
    from hostguard.poststart.hostmade_disks import HostMadeDisk, inspect_host_made

    base = tmp_path / "ephemeral_1_0706d66"
    base.write_bytes(b"\x5a" * (4 << 20))  # no filesystem the reader knows
    st = base.stat()
    disk = HostMadeDisk("vdb", "Nova ephemeral base", [LayerRecord(base, "raw", st.st_dev, st.st_ino)])
    findings, notes = inspect_host_made(disk)
    assert notes == []
    assert [(f.kind, f.path) for f in findings] == [("check-unavailable", "vdb")], findings
    assert "cannot be read" in str(findings[0].found)
