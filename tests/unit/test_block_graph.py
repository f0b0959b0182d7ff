"""The block-graph stage (issue 14, after start): QEMU's actual nodes and open files against what pre-boot verified.

QEMU's answers are fakes here (the adapter's two readers are replaced); the files are real, so identities are the
kernel's. tests/integration/test_daemon_graph.py does the same against a real libvirtd and QEMU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hostguard.domain.record import DomainRecord, RecordedDisk, RecordedHostMade, RecordedLayer
from hostguard.errors import ConfigError
from hostguard.host.config import Config, load_config
from hostguard.host.libvirt import BlockNode, OpenFile, parse_block_nodes
from hostguard.host.statedir import save_domain_record
from hostguard.poststart import graph_stage
from hostguard.poststart.check import check_domain, stage_hotplug, stage_record
from hostguard.poststart.context import CheckContext
from hostguard.record import replace
from hostguard.signed.findings import (
    CHECK_UNAVAILABLE,
    UNSIGNED_HOTPLUG,
    UNVERIFIED_BLOCK_NODE,
    UNVERIFIED_MEDIA,
    UNVERIFIED_OPEN,
    Finding,
)
from tests.unit.libvirt_fakes import FakeDomain

UUID = "6f1c2b7e-9a43-4d2e-8c1f-2b9d3e4a5f60"
PID_FILE = "/run/libvirt/qemu/g.pid"


class Guest:
    """A verified two-layer disk (overlay over a signed base) as real files, its record and its QEMU."""

    def __init__(self, tmp: Path, policy: str = "") -> None:
        self.tmp = tmp
        self.overlay, self.base = self.file("top.qcow2"), self.file("base.qcow2")
        self.record = DomainRecord(
            name="g",
            uuid=UUID,
            disks=(
                RecordedDisk(
                    "vda",
                    str(self.base) + ".hgsig",
                    (self.layer(self.overlay, "overlay"), self.layer(self.base, "signed")),
                ),
            ),
            host_made=(),
        )
        cfg = tmp / "hostguard.toml"
        cfg.write_text(f'[trust]\ndir = "{tmp}"\n[state]\ndir = "{tmp / "state"}"\n[policy]\n{policy}\n')
        self.config: Config = load_config(cfg)
        self.cdrom: Path | None = None
        self.nodes = [*self.chain(self.overlay, "libvirt-2"), *self.chain(self.base, "libvirt-1", read_only=True)]
        self.held = [self.open(self.overlay, 11), self.open(self.base, 12)]

    def file(self, name: str, data: bytes = b"\0" * 4096) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    @staticmethod
    def layer(path: Path, role: str) -> RecordedLayer:
        st = path.stat()
        return RecordedLayer(str(path), "qcow2", st.st_dev, st.st_ino, role)

    @staticmethod
    def chain(path: Path, name: str, fmt: str = "qcow2", read_only: bool = False) -> list[BlockNode]:
        """A format node over a file node, as libvirt's -blockdev makes them: a backing layer's format node
        read-only, every file node under a format node `auto-read-only`, which QEMU reports as not read-only."""
        return [
            BlockNode(f"{name}-format", fmt, str(path), read_only),
            BlockNode(f"{name}-storage", "file", str(path), False),
        ]

    @staticmethod
    def open(path: Path, fd: int) -> OpenFile:
        st = path.stat()
        return OpenFile(fd, str(path), st.st_dev, st.st_ino)

    def xml(self) -> bytes:
        media = f"<source file='{self.cdrom}'/>" if self.cdrom else ""
        return (
            f"<domain type='qemu'><name>g</name><uuid>{UUID}</uuid><os><type>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{self.overlay}'/>"
            "<target dev='vda'/></disk>"
            f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>{media}<target dev='sda' bus='sata'/>"
            "<readonly/></disk></devices></domain>"
        ).encode()

    def judge(self) -> list[Finding]:
        from hostguard.domain.xmlparse import parse_domain_xml

        return graph_stage.judge_graph(
            self.nodes, self.held, self.record, parse_domain_xml(self.xml()), self.config, pid_file=PID_FILE
        )

    def insert_media(self, name: str) -> Path:
        """What `virsh change-media --insert` leaves: the live XML names it, QEMU has two new nodes open on it."""
        self.cdrom = self.file(name, b"CD001" * 100)
        self.nodes += self.chain(self.cdrom, "libvirt-3", "raw")
        self.held.append(self.open(self.cdrom, 20))
        return self.cdrom


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    return Guest(tmp_path)


def kinds(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.path) for f in findings]


def test_an_unchanged_guest_has_no_finding(guest: Guest) -> None:
    guest.held += [OpenFile(5, PID_FILE, 1, 99), OpenFile(30, "/memfd:pc.ram (deleted)", 1, 98)]
    guest.nodes.append(BlockNode("throttle-1", "throttle", "json:{}", False))
    assert guest.judge() == []


def test_cdrom_media_change_to_an_unsigned_iso_is_unverified_media(guest: Guest) -> None:
    iso = guest.insert_media("evil.iso")
    findings = guest.judge()
    assert kinds(findings) == [(UNVERIFIED_MEDIA, str(iso))]
    assert "inserted after start" in (findings[0].found or "") and "\n" not in findings[0].describe()


def test_cdrom_media_allowed_by_policy_is_no_finding(tmp_path: Path) -> None:
    guest = Guest(tmp_path, "allow_cdrom = true")
    guest.insert_media("any.iso")
    assert guest.judge() == []


def test_an_unsigned_middle_layer_inserted_into_the_chain_is_found(guest: Guest) -> None:
    middle = guest.file("middle.qcow2")
    guest.nodes[2:2] = guest.chain(middle, "libvirt-9")
    guest.held.append(guest.open(middle, 13))
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, str(middle))]


def test_a_file_swapped_under_a_verified_path_is_found(guest: Guest) -> None:
    other = guest.file("other.qcow2")
    guest.held[1] = OpenFile(12, str(guest.base), other.stat().st_dev, other.stat().st_ino)
    findings = guest.judge()
    assert kinds(findings) == [(UNVERIFIED_BLOCK_NODE, str(guest.base))]
    assert "another file open at this path" in (findings[0].found or "")


def test_a_verified_file_renamed_away_while_open_is_found(guest: Guest) -> None:
    guest.held[1] = OpenFile(12, str(guest.base) + ".old", guest.held[1].dev, guest.held[1].ino)
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, str(guest.base))]


def test_a_node_added_with_blockdev_add_is_found(guest: Guest) -> None:
    extra = guest.file("extra.raw")
    guest.nodes.append(BlockNode("sneaky", "file", str(extra), True))
    guest.held.append(guest.open(extra, 40))
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, str(extra))]


def test_a_block_copy_target_is_found(guest: Guest) -> None:
    copy = guest.file("copy.qcow2")
    guest.nodes = [BlockNode("mirror-top", "mirror_top", str(guest.overlay), False), *guest.nodes]
    guest.nodes += guest.chain(copy, "libvirt-5")
    guest.held.append(guest.open(copy, 41))
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, str(copy))]


def test_an_extra_file_qemu_holds_outside_the_graph_is_found(guest: Guest) -> None:
    extra = guest.file("held.bin")
    guest.held.append(guest.open(extra, 42))
    findings = guest.judge()
    assert kinds(findings) == [(UNVERIFIED_OPEN, str(extra))]
    assert findings[0].found == "QEMU holds it open (fd 42)"


def test_a_verified_raw_file_read_as_qcow2_is_found(guest: Guest) -> None:
    guest.nodes[0] = BlockNode("libvirt-2-format", "raw", str(guest.overlay), False)
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, str(guest.overlay))]


@pytest.mark.parametrize("driver", ["vvfat", "blkdebug", "null-co", "luks"])
def test_a_driver_hostguard_does_not_verify_is_found(guest: Guest, driver: str) -> None:
    guest.nodes.append(BlockNode("odd", driver, "fat:/etc", True))
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, "fat:/etc")]


def test_network_nodes_need_the_policy(guest: Guest, tmp_path: Path) -> None:
    guest.nodes.append(BlockNode("net", "nbd", "nbd://10.0.0.1/x", False))
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, "nbd://10.0.0.1/x")]
    (tmp_path / "lax").mkdir()
    lax = Guest(tmp_path / "lax", "allow_network_disks = true")
    lax.nodes.append(BlockNode("net", "nbd", "nbd://10.0.0.1/x", False))
    assert lax.judge() == []


def test_host_made_files_on_record_are_accepted_and_nothing_else(guest: Guest) -> None:
    drive = guest.file("disk.config")
    st = drive.stat()
    guest.record = replace(
        guest.record, host_made=(RecordedHostMade("hdd", "Nova config drive", str(drive), st.st_dev, st.st_ino),)
    )
    guest.nodes += guest.chain(drive, "libvirt-4", "raw")
    guest.held.append(guest.open(drive, 21))
    assert guest.judge() == []


# --- the stage itself: its inputs through the adapter, its failures --------------------------------------------


def fake_qemu(guest: Guest, monkeypatch: pytest.MonkeyPatch, failure: Exception | None = None) -> None:
    """The adapter's QEMU readers answer from `guest` (or fail with `failure`)."""

    def block_nodes(_dom: Any) -> tuple[BlockNode, ...]:
        if failure is not None:
            raise failure
        return tuple(guest.nodes)

    monkeypatch.setattr(graph_stage, "qemu_pid", lambda _name: 4242)
    monkeypatch.setattr(graph_stage, "qemu_block_nodes", block_nodes)
    monkeypatch.setattr(graph_stage, "open_files", lambda _pid: tuple(guest.held))


def stage(guest: Guest, monkeypatch: pytest.MonkeyPatch, failure: Exception | None = None) -> list[Finding]:
    fake_qemu(guest, monkeypatch, failure)
    dom = FakeDomain(domain_name="g", uuid=UUID, xml=guest.xml().decode())
    ctx = CheckContext(guest.config, dom, "g", UUID, guest.xml(), record=guest.record)
    return graph_stage.stage_block_graph(ctx)


def test_a_monitor_that_cannot_be_asked_makes_the_check_unavailable(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    findings = stage(guest, monkeypatch, ConfigError("QEMU monitor of g: timed out"))
    assert kinds(findings) == [(CHECK_UNAVAILABLE, "block-graph")]
    assert findings[0].found == "QEMU monitor of g: timed out"


def test_a_record_without_host_made_files_under_a_stack_profile_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = Guest(tmp_path, 'profile = "nova"')
    guest.record = replace(guest.record, host_made=None)
    assert kinds(stage(guest, monkeypatch)) == [(CHECK_UNAVAILABLE, "block-graph")]


@pytest.mark.parametrize(
    "reply",
    ["", "[]", '{"return": {}}', '{"return": [1]}', '{"return": [{"node-name": "a", "drv": 3, "file": "x"}]}'],
)
def test_a_malformed_qmp_reply_is_refused(reply: str) -> None:
    with pytest.raises(ConfigError, match="query-named-block-nodes"):
        parse_block_nodes(reply)


def test_a_qmp_reply_reads_into_nodes() -> None:
    reply = '{"return": [{"node-name": "libvirt-1-storage", "drv": "file", "file": "/img/a", "ro": true}]}'
    assert parse_block_nodes(reply) == (BlockNode("libvirt-1-storage", "file", "/img/a", True),)


def test_media_change_through_check_domain_is_a_finding_with_the_policy_action(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack end to end through the check the daemon runs: the verdict fails and asks for the action."""
    save_domain_record(guest.config.state_dir, guest.record)
    iso = guest.insert_media("evil.iso")
    fake_qemu(guest, monkeypatch)
    dom = FakeDomain(domain_name="g", uuid=UUID, xml=guest.xml().decode())
    stages = (("record", stage_record), ("hotplug", stage_hotplug), ("block-graph", graph_stage.stage_block_graph))
    verdict = check_domain(guest.config, dom, "tray-change:sata0-0-0:close", stages)
    assert verdict.status == "fail" and verdict.action == "pause"
    assert kinds(list(verdict.findings)) == [(UNVERIFIED_MEDIA, str(iso))]


def test_a_hotplugged_disk_is_reported_once_by_the_hotplug_stage(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    save_domain_record(guest.config.state_dir, guest.record)
    extra = guest.file("hot.raw")
    xml = guest.xml().replace(
        b"</devices>",
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{extra}'/>"
        "<target dev='vdb'/></disk></devices>".encode(),
    )
    guest.nodes += guest.chain(extra, "libvirt-6", "raw")
    guest.held.append(guest.open(extra, 50))
    fake_qemu(guest, monkeypatch)
    dom = FakeDomain(domain_name="g", uuid=UUID, xml=xml.decode())
    stages = (("record", stage_record), ("hotplug", stage_hotplug), ("block-graph", graph_stage.stage_block_graph))
    verdict = check_domain(guest.config, dom, "device-added:virtio-disk1", stages)
    assert kinds(list(verdict.findings)) == [(UNSIGNED_HOTPLUG, "vdb")]


# --- the daemon reacts to the events that change the graph ---------------------------------------------------


class Registrations:
    def __init__(self) -> None:
        self.events: list[int] = []

    def domainEventRegisterAny(self, _dom: Any, event: int, _cb: Any, _opaque: Any) -> int:
        self.events.append(event)
        return len(self.events)


def test_the_daemon_registers_media_device_and_block_job_events(guest: Guest) -> None:
    from hostguard.host import libvirt
    from hostguard.poststart.daemon import Daemon

    conn = Registrations()
    Daemon(guest.config)._register_graph_events(conn)  # type: ignore[arg-type]
    assert conn.events == [
        libvirt.VIR_DOMAIN_EVENT_ID_TRAY_CHANGE,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
        libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
    ]


def test_a_tray_change_or_block_job_queues_a_check_of_that_domain(tmp_path: Path) -> None:
    from hostguard.poststart.daemon import Daemon

    guest = Guest(tmp_path, 'exempt = ["skip-*"]')
    daemon = Daemon(guest.config)
    dom = FakeDomain(domain_name="g", uuid=UUID)
    daemon._on_tray_change(None, dom, "sata0-0-0", 1, None)  # type: ignore[arg-type]
    daemon._on_block_job(None, dom, "vda", 2, 0, None)  # type: ignore[arg-type]  # merged: one check queued
    daemon._on_device_removed(None, FakeDomain(domain_name="skip-me"), "virtio-disk1", None)  # type: ignore[arg-type]
    assert daemon.queue.get_nowait() == (UUID, "tray-change:sata0-0-0:close")
    assert daemon.queue.empty()
    daemon.pending.clear()
    daemon._on_block_job(None, dom, "vda", 2, 3, None)  # type: ignore[arg-type]
    assert daemon.queue.get_nowait() == (UUID, "block-job:vda:2:3")


def test_open_files_lists_regular_files_with_their_identity(tmp_path: Path) -> None:
    from hostguard.host.libvirt import open_files

    path = tmp_path / "held"
    path.write_bytes(b"x")
    with path.open("rb") as fh:
        fd = fh.fileno()
        found = [f for f in open_files(os.getpid()) if f.fd == fd]
    assert found == [OpenFile(fd, str(path), path.stat().st_dev, path.stat().st_ino)]
    with pytest.raises(ConfigError, match="cannot list the open files"):
        open_files(2**22 + 7)


def test_a_write_only_file_qemu_holds_is_no_finding(guest: Guest) -> None:
    """A memory dump or screenshot QEMU writes (libvirt passes it O_WRONLY) gives the guest nothing to read."""
    dump = guest.file("guest.core")
    guest.held.append(replace(guest.open(dump, 43), readable=False))
    assert guest.judge() == []


def test_open_files_tells_write_only_descriptors(tmp_path: Path) -> None:
    from hostguard.host.libvirt import open_files

    path = tmp_path / "dump"
    with path.open("wb") as fh:
        fd = fh.fileno()
        assert [f.readable for f in open_files(os.getpid()) if f.fd == fd] == [False]


def test_allow_block_devices_admits_block_device_nodes_only(tmp_path: Path) -> None:
    guest = Guest(tmp_path, 'allow_block_devices = ["/dev/vg0/*"]')
    guest.nodes.append(BlockNode("lv", "host_device", "/dev/vg0/data", False))
    assert guest.judge() == []
    guest.nodes.append(BlockNode("fake", "file", "/dev/vg0/notablock", False))  # a regular file where a LV would be
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, "/dev/vg0/notablock")]


# --- the hot-plug stage knows what pre-boot admitted besides signed disks (issue 15 follow-up) -----------------


def nova_guest(tmp_path: Path, policy: str = 'profile = "nova"') -> tuple[Guest, bytes]:
    """A Nova-shaped domain as the hook lets it start: the signed root disk, ephemeral and swap overlays over
    host-made bases (vdb, vdc) and the config drive (hdd), their files on record as host-made; and its live XML."""
    guest = Guest(tmp_path, policy)
    host_made, disks = [], ""
    for target, kind, top, base in (
        ("vdb", "Nova ephemeral base", "disk.eph0", "ephemeral_1_0706d66"),
        ("vdc", "Nova swap base", "disk.swap", "swap_256"),
    ):
        files = [guest.file(top), guest.file(base)]
        host_made += [RecordedHostMade(target, kind, str(f), f.stat().st_dev, f.stat().st_ino) for f in files]
        guest.nodes += guest.chain(files[0], f"libvirt-{target}")
        guest.nodes += guest.chain(files[1], f"libvirt-{target}-b", "raw", read_only=True)
        guest.held += [guest.open(f, 60 + len(guest.held)) for f in files]
        disks += (
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{files[0]}'/>"
            f"<target dev='{target}'/></disk>"
        )
    drive = guest.file("disk.config", b"CD001" * 100)
    host_made.append(RecordedHostMade("hdd", "Nova config drive", str(drive), drive.stat().st_dev, drive.stat().st_ino))
    guest.nodes += guest.chain(drive, "libvirt-cfg", "raw", read_only=True)
    guest.held.append(guest.open(drive, 70))
    disks += (
        f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{drive}'/>"
        "<target dev='hdd' bus='ide'/><readonly/></disk>"
    )
    guest.record = replace(guest.record, host_made=tuple(host_made))
    save_domain_record(guest.config.state_dir, guest.record)
    return guest, guest.xml().replace(b"</devices>", disks.encode() + b"</devices>")


def check_live(guest: Guest, xml: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    fake_qemu(guest, monkeypatch)
    dom = FakeDomain(domain_name="g", uuid=UUID, xml=xml.decode())
    stages = (("record", stage_record), ("hotplug", stage_hotplug), ("block-graph", graph_stage.stage_block_graph))
    return check_domain(guest.config, dom, "interval", stages)


def test_a_pass_names_the_stages_that_ran_and_keeps_what_they_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the memory check off in the configuration, a pass does not say memory was checked; and what stages
    counted (ctx.extra: the disk stage's mode, the memory read method) is on the verdict, as JSON."""
    from hostguard.poststart.memory_stage import stage_memory

    guest, xml = nova_guest(tmp_path)
    guest.config.memory_check = False
    fake_qemu(guest, monkeypatch)

    def counting(ctx: CheckContext) -> list[Any]:
        ctx.extra["counting"] = {"mode": "incremental", "image": tmp_path, "bytes": 4096}
        return []

    dom = FakeDomain(domain_name="g", uuid=UUID, xml=xml.decode())
    stages = (("record", stage_record), ("counting", counting), ("memory", stage_memory))
    verdict = check_domain(guest.config, dom, "interval", stages)
    assert verdict.status == "pass", verdict.findings
    assert verdict.reason == "no findings (record, counting checked); memory check off in the configuration"
    assert verdict.to_json()["stats"] == {"counting": {"mode": "incremental", "image": str(tmp_path), "bytes": 4096}}

    def looping(ctx: CheckContext) -> list[Any]:
        loop: dict[str, Any] = {}
        loop["self"] = loop
        ctx.extra["looping"] = loop  # statistics that cannot be written down never make the check an error
        return []

    verdict = check_domain(guest.config, dom, "interval", (("record", stage_record), ("looping", looping)))
    assert verdict.status == "pass", verdict.reason
    assert "unrecorded" in verdict.stats


def test_a_nova_domain_started_as_the_hook_allowed_it_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ephemeral, swap and config-drive disks are on record as host-made: no unsigned-hotplug-disk."""
    guest, xml = nova_guest(tmp_path)
    verdict = check_live(guest, xml, monkeypatch)
    assert verdict.status == "pass", verdict.findings


def test_a_host_made_looking_disk_hotplugged_after_start_is_still_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Being the kind of disk Nova makes is no admission after start: only the files the hook recorded are."""
    guest, xml = nova_guest(tmp_path)
    late = guest.file("late.eph")
    guest.nodes += guest.chain(late, "libvirt-late", "raw")
    guest.held.append(guest.open(late, 80))
    xml = xml.replace(
        b"</devices>",
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{late}'/>"
        "<target dev='vdd'/></disk></devices>".encode(),
    )
    verdict = check_live(guest, xml, monkeypatch)
    assert kinds(list(verdict.findings)) == [(UNSIGNED_HOTPLUG, "vdd")]


def test_a_host_made_disk_swapped_for_another_file_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guest, xml = nova_guest(tmp_path)
    other = guest.file("other.eph")
    xml = xml.replace(str(tmp_path / "disk.eph0").encode(), str(other).encode())
    verdict = check_live(guest, xml, monkeypatch)
    assert kinds(list(verdict.findings))[0] == (UNSIGNED_HOTPLUG, "vdb")
    assert verdict.findings[0].expected == str(tmp_path / "disk.eph0")


def test_a_block_device_the_policy_admits_is_no_hotplug_finding_and_another_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`allow_block_devices` admits a block disk after start exactly as the hook admits it before."""
    guest = Guest(tmp_path, 'allow_block_devices = ["/dev/vg0/*"]')
    save_domain_record(guest.config.state_dir, guest.record)
    guest.nodes.append(BlockNode("lv", "host_device", "/dev/vg0/data", False))
    disk = (
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/><target dev='{}'/></disk>"
    )
    xml = guest.xml().replace(b"</devices>", disk.format("/dev/vg0/data", "vdb").encode() + b"</devices>")
    assert check_live(guest, xml, monkeypatch).status == "pass"
    xml = xml.replace(b"</devices>", disk.format("/dev/vg1/data", "vdc").encode() + b"</devices>")
    assert kinds(list(check_live(guest, xml, monkeypatch).findings)) == [(UNSIGNED_HOTPLUG, "vdc")]


def test_a_block_commit_into_the_signed_base_is_found(guest: Guest) -> None:
    """`virsh blockcommit --active` (base: the bottom of the chain) reopens the signed base for writing and copies
    the overlays into it: every file stays the verified one, only the base's read-only flag tells."""
    guest.nodes = [
        BlockNode("commit-top", "commit_top", str(guest.overlay), False),
        *guest.chain(guest.overlay, "libvirt-2"),
        *guest.chain(guest.base, "libvirt-1"),
    ]
    findings = guest.judge()
    assert kinds(findings) == [(UNVERIFIED_BLOCK_NODE, str(guest.base))]
    assert "open for writing" in (findings[0].found or "")


def test_a_host_made_base_opened_for_writing_is_found(tmp_path: Path) -> None:
    """Nova shares `_base/ephemeral_*` between instances: a commit into it is a finding like one into a signed base."""
    guest, _ = nova_guest(tmp_path)
    base = str(tmp_path / "ephemeral_1_0706d66")
    guest.nodes = [replace(n, read_only=False) if n.filename == base else n for n in guest.nodes]
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, base)]


def test_a_raw_base_without_a_format_layer_is_judged_by_its_file_node(guest: Guest) -> None:
    """libvirt leaves out the format layer of a plain raw file: its file node carries the read-only flag."""
    guest.nodes = [
        *guest.chain(guest.overlay, "libvirt-2"),
        BlockNode("libvirt-1-storage", "file", str(guest.base), True),
    ]
    assert guest.judge() == []
    guest.nodes[-1] = replace(guest.nodes[-1], read_only=False)
    assert kinds(guest.judge()) == [(UNVERIFIED_BLOCK_NODE, str(guest.base))]
