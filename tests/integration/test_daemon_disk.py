"""The daemon's disk-content stage on real TCG guests under the real libvirtd: a clean guest passes and keeps
running (read-only and read-write roots), and a guest whose disk gains an executable or a setuid bit after its
pre-boot check is paused or destroyed per policy with the finding naming the file, whether QEMU wrote the change
for the host (HMP qemu-io, as anyone with the monitor could) or the guest wrote it itself (left in the ext4
journal). `hostguard start` never runs a tampered guest's vCPUs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.unit.diskcheck_images import debugfs, diff_ranges, qemu_io_write

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DROPPER = """#!/bin/sh
# Runs in the guest (hostguard.run=): writes a new setuid executable to its own root disk.
cp /bin/busybox /usr/local/bin/dropped
chmod 4755 /usr/local/bin/dropped
sync
echo HOSTGUARD-DROPPED
"""


@pytest.fixture(scope="module")
def host() -> Iterator[GuardedHost]:
    with GuardedHost() as h:
        yield h


@pytest.fixture(scope="module")
def signed_base(host: GuardedHost, busybox_guest: Guest) -> Path:
    return host.publish(busybox_guest, "busybox", 1)


@pytest.fixture(scope="module")
def dropper_guest(host: GuardedHost, busybox_guest: Guest) -> Guest:
    """The busybox guest plus /usr/local/bin/drop (signed with the image: a legitimate program that writes an
    executable when run)."""
    work = host.dir / "dropper"
    work.mkdir()
    script = work / "drop"
    script.write_text(DROPPER)
    raw = work / "root.raw"
    shutil.copyfile(busybox_guest.root_raw, raw)
    debugfs(raw, [f"write {script} /usr/local/bin/drop", "sif /usr/local/bin/drop mode 0100755"])
    qcow2 = work / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    return dataclasses.replace(busybox_guest, name="dropper", root_qcow2=qcow2, root_raw=raw)


@pytest.fixture(scope="module")
def signed_dropper(host: GuardedHost, dropper_guest: Guest) -> Path:
    return host.publish(dropper_guest, "dropper", 1)


def run_daemon_once(host: GuardedHost, config: Path | None = None) -> str:
    """`hostguard daemon --once`: checks every running domain, applies the verdicts; returns its log."""
    proc = subprocess.run(
        [sys.executable, "-m", "hostguard.cli", "daemon", "--once", "--config", str(config or host.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def verdict_of(host: GuardedHost, dom: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((host.state / "verdicts" / f"{dom.UUIDString()}.json").read_text())
    return doc


def disk_notes(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """Notes on the verdict from the disk-content stage (checks that could not run, which policy only logs)."""
    return [n for n in verdict.get("notes", []) if n.get("expected") == "the disk content check"]


def disk_log(log: str, dom: Any) -> dict[str, Any]:
    """The stage's own account (hostguard.poststart.disk_stage logs it per check)."""
    marker = f"{dom.name()}: disk content: "
    lines = [line for line in log.splitlines() if marker in line]
    assert lines, log[-3000:]
    doc: dict[str, Any] = json.loads(lines[-1].split(marker, 1)[1])
    return doc


def config_with(host: GuardedHost, name: str, policy: str) -> Path:
    path = host.dir / f"{name}.toml"
    path.write_text(host.config.read_text().replace("[policy]\n", f"[policy]\n{policy}\n", 1))
    return path


def changed_root(guest: Guest, work: Path, commands: list[str]) -> tuple[bytes, bytes]:
    """The guest's root disk bytes before and after debugfs `commands` (made on a copy)."""
    target = work / "changed.raw"
    shutil.copyfile(guest.root_raw, target)
    debugfs(target, commands)
    return guest.root_raw.read_bytes(), target.read_bytes()


def write_through_qemu(env: LibvirtEnv, dom: Any, disk: Path, before: bytes, after: bytes) -> int:
    """Write the differing 4 KiB pieces into the running domain's disk through QEMU's monitor (HMP qemu-io on
    the virtio disk's backend), while the domain is paused. Returns the bytes written."""
    blocks = json.loads(
        subprocess.run(
            ["virsh", "qemu-monitor-command", dom.name(), '{"execute":"query-block"}'],
            capture_output=True, text=True, check=True,
        ).stdout
    )["return"]  # fmt: skip
    qdev = next(b["qdev"] for b in blocks if b.get("inserted", {}).get("file") == str(disk))
    ranges = diff_ranges(before, after, 4096)
    dom.suspend()
    try:
        for i, (off, n) in enumerate(ranges):
            piece = env.path(f"piece-{i}")
            piece.write_bytes(after[off : off + n])
            piece.chmod(0o644)
            hmp = f'qemu-io -d {qdev} "write -s {piece} {off} {n}"'
            out = subprocess.run(
                ["virsh", "qemu-monitor-command", dom.name(), "--hmp", hmp], capture_output=True, text=True, check=True
            ).stdout.strip()
            assert out == "", out
    finally:
        dom.resume()
    return sum(n for _, n in ranges)


def test_clean_guest_passes_then_a_new_executable_written_into_its_disk_pauses_it(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    disk = libvirt_env.overlay(signed_base, "clean.qcow2")
    dom = libvirt_env.boot("disk-clean", busybox_guest, disk_path=disk)
    log = run_daemon_once(host)
    verdict = verdict_of(host, dom)
    assert verdict["status"] == "pass", verdict
    assert "disk-content" in verdict["stages_ms"] and disk_notes(verdict) == []
    stats = disk_log(log, dom)
    assert stats["suspended"] is True and stats["sets"][0]["image"] == "busybox v1"
    assert dom.info()[0] == 1  # running again after the check

    implant = ["write /usr/bin/true /usr/local/bin/implant", "sif /usr/local/bin/implant mode 0100755"]
    before, after = changed_root(busybox_guest, libvirt_env.workdir, implant)
    assert write_through_qemu(libvirt_env, dom, disk, before, after) > 0
    log = run_daemon_once(host)
    verdict = verdict_of(host, dom)
    assert verdict["status"] == "fail" and verdict["action"] == "pause"
    assert [(f["kind"], f["path"]) for f in verdict["findings"]] == [
        ("unexpected-executable", "/usr/local/bin/implant")
    ]
    assert disk_log(log, dom)["sets"][0]["mode"] == "incremental"
    state = subprocess.run(["virsh", "domstate", dom.name(), "--reason"], capture_output=True, text=True).stdout
    assert state.startswith("paused")


def test_a_setuid_bit_set_after_start_destroys_the_guest_under_that_policy(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    disk = libvirt_env.overlay(signed_base, "suid.qcow2")
    dom = libvirt_env.boot("disk-suid", busybox_guest, disk_path=disk)
    before, after = changed_root(busybox_guest, libvirt_env.workdir, ["sif /usr/bin/true mode 0104755"])
    write_through_qemu(libvirt_env, dom, disk, before, after)
    run_daemon_once(host, config_with(host, "destroy", 'action = "destroy"'))
    assert not dom.isActive()
    verdict = verdict_of(host, dom)
    assert verdict["action"] == "destroy"
    assert [(f["kind"], f["path"], f["expected"], f["found"]) for f in verdict["findings"]] == [
        ("changed-executable", "/usr/bin/true", "mode=0o755", "mode=0o4755")
    ]


def test_read_write_root_passes_and_an_executable_the_guest_writes_itself_is_found(
    host: GuardedHost, signed_dropper: Path, libvirt_env: LibvirtEnv, dropper_guest: Guest
) -> None:
    # Mounted read-write, the guest's ext4 needs recovery while it runs: the check replays its journal.
    clean = libvirt_env.boot(
        "disk-rw", dropper_guest, disk_path=libvirt_env.overlay(signed_dropper, "rw.qcow2"),
        cmdline_extra="hostguard.rw=1",
    )  # fmt: skip
    dropper = libvirt_env.define_guest(
        "disk-drop", dropper_guest, disk_path=libvirt_env.overlay(signed_dropper, "drop.qcow2"),
        cmdline_extra="hostguard.rw=1 hostguard.run=/usr/local/bin/drop",
    )  # fmt: skip
    dropper.create()
    libvirt_env.wait_for_console(dropper, "HOSTGUARD-DROPPED", timeout=120)
    log = run_daemon_once(host)
    verdict = verdict_of(host, clean)
    assert verdict["status"] == "pass", verdict
    assert disk_notes(verdict) == []
    assert clean.info()[0] == 1
    verdict = verdict_of(host, dropper)
    assert verdict["status"] == "fail" and verdict["action"] == "pause", verdict
    assert [(f["kind"], f["path"]) for f in verdict["findings"]] == [
        ("unexpected-executable", "/usr/local/bin/dropped")
    ]
    assert "mode=0o4755" in verdict["findings"][0]["found"]
    stats = disk_log(log, dropper)["sets"][0]
    assert stats["mode"] == "incremental"
    print(f"guest-written change: {json.dumps(stats)}")


def test_hostguard_start_never_runs_a_tampered_guest(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    disk = libvirt_env.overlay(signed_base, "qtamper.qcow2")
    before, after = changed_root(busybox_guest, libvirt_env.workdir, ["sif /bin/busybox mode 0104755"])
    qemu_io_write(disk, "qcow2", after, diff_ranges(before, after, 4096), libvirt_env.workdir)
    dom = libvirt_env.define_guest("disk-qstart", busybox_guest, disk_path=disk)
    result = subprocess.run(
        [sys.executable, "-m", "hostguard.cli", "start", dom.name(), "--config", str(host.config)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr
    assert "changed-executable /bin/busybox" in result.stderr
    # The overlay's content is read before boot now (ADR 0018): the hook refuses the start itself, so QEMU never
    # ran (before, `hostguard start` started it paused and its check kept it paused).
    state = subprocess.run(["virsh", "domstate", dom.name(), "--reason"], capture_output=True, text=True).stdout
    assert state.startswith("shut off"), state
    assert libvirt_env.console_text(dom) == ""  # not one guest instruction ran: no kernel output at all
    prepare = [r for r in host.audit_records() if r.get("domain") == dom.name() and r.get("operation") == "prepare"]
    assert [r["verdict"] for r in prepare] == ["deny"], prepare
