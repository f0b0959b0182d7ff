"""XFS guests under the real libvirtd, the installed hook and the daemon (issue 19, ADR 0023): the busybox guest's
root content on an XFS root disk (the Debian kernel, an initramfs that loads xfs).

* read-only root: the post-start verdict is pass; an executable QEMU writes into the XFS overlay is a finding;
* read-write root: the guest writes an executable itself; while its metadata is only in the XFS log the disk
  check reports "xfs log not clean" (check-unavailable, never a silent pass), and once the guest's kernel has
  written it in place (the log quiesces) the executable is a finding;
* the guest kernel's own logs, the guest destroyed mid-write or after a quiesce: the fast reader either
  refuses ("xfs log not clean") or reads exactly what the host kernel's log recovery gives (file digests)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.imagefs import ImageSpec, UnsupportedLayout
from hostguard.imagefs.chain import open_chain
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.inventory import inventory
from hostguard.signed.manifest import FileEntry
from tests.integration.test_daemon_disk import disk_log, disk_notes, run_daemon_once, verdict_of, write_through_qemu
from tests.testbed import content, images
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import INITRAMFS_INIT, INITRAMFS_MODULES, Guest, build_initramfs
from tests.testbed.libvirt_env import LibvirtEnv
from tests.unit import inventory_images as imgs
from tests.unit.diskcheck_images import diff_ranges, layer, qemu_io_write

pytestmark = pytest.mark.integration
DROPPER = """#!/bin/sh
# Runs in the guest (hostguard.run=): writes a new setuid executable to its own (XFS) root disk.
cp /bin/busybox /usr/local/bin/dropped
chmod 4755 /usr/local/bin/dropped
sync
echo HOSTGUARD-DROPPED
"""
WRITER = """#!/bin/sh
# Runs in the guest (hostguard.run=): metadata traffic on the XFS root until the host destroys the guest;
# with "quiesce" in /etc/xfs-writer it stops, freezes and thaws the filesystem (the log is covered), and idles.
mkdir -p /var/w
i=0
while [ $i -lt 200 ]; do echo $i > /var/w/f$i; i=$((i + 1)); done
cp /bin/busybox /var/w/tool && chmod 4755 /var/w/tool
sync
if [ -e /etc/xfs-quiesce ]; then
  busybox fsfreeze --freeze / && busybox fsfreeze --unfreeze /
  echo XTEST-QUIET
  while :; do sleep 3600; done
fi
echo XTEST-WRITING
k=0
while :; do
  mkdir -p /var/w/r$k && echo $k > /var/w/r$k/x && cp /bin/busybox /var/w/r$k/tool$k && rm -rf /var/w/r$((k - 3))
  k=$((k + 1))
done
"""
POLL_SECONDS = 420


@pytest.fixture(scope="module")
def host() -> Iterator[GuardedHost]:
    with GuardedHost() as h:
        yield h


@pytest.fixture(scope="module")
def xfs_guest(busybox_guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The busybox guest's root content (plus the drop and writer programs) on an XFS root disk."""
    d = tmp_path_factory.mktemp("xfs-guest")
    tree = d / "tree"
    expected = content.populate_root(tree, kver=busybox_guest.kernel_version)
    (tree / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    for name, text in (("drop", DROPPER), ("xfs-writer", WRITER)):
        (tree / "usr/local/bin" / name).write_text(text)
        (tree / "usr/local/bin" / name).chmod(0o755)
    raw = imgs.make_xfs(tree, d / "root.raw", options=("-L", "hgt-xfs"), size_mb=160)
    qcow2 = images.to_qcow2(raw, d / "root.qcow2")
    initrd = build_initramfs(
        busybox_guest.kernel_version, d / "initrd.img", modules=(*INITRAMFS_MODULES, "xfs"),
        init=INITRAMFS_INIT.replace("mount -t ext4", "mount -t xfs"),
    )  # fmt: skip
    for f in (raw, qcow2, initrd):
        f.chmod(0o644)
    return dataclasses.replace(busybox_guest, name="xfsbox", initrd=initrd, root_qcow2=qcow2, root_raw=raw,
                               expected=expected)  # fmt: skip


@pytest.fixture(scope="module")
def signed_xfs(host: GuardedHost, xfs_guest: Guest) -> Path:
    return host.publish(xfs_guest, "xfsbox", 1, reader="fast")


def changed_root(guest: Guest, work: Path, script: str) -> tuple[bytes, bytes]:
    """The guest's root disk bytes before and after `script` run in a loop mount of a copy (cleanly unmounted)."""
    target = work / "changed-xfs.raw"
    shutil.copyfile(guest.root_raw, target)
    mnt = work / "changed-xfs.mnt"
    mnt.mkdir(exist_ok=True)
    imgs.run("mount", "-o", "loop", target, mnt)
    try:
        imgs.run("sh", "-euc", f"cd {mnt}\n{script}")
    finally:
        imgs.run("umount", mnt)
    return guest.root_raw.read_bytes(), target.read_bytes()


def test_read_only_xfs_root_passes_and_an_executable_written_into_its_overlay_is_found(
    host: GuardedHost, signed_xfs: Path, libvirt_env: LibvirtEnv, xfs_guest: Guest
) -> None:
    disk = libvirt_env.overlay(signed_xfs, "xfs-ro.qcow2")
    dom = libvirt_env.boot("xfs-ro", xfs_guest, disk_path=disk)
    log = run_daemon_once(host)
    verdict = verdict_of(host, dom)
    assert verdict["status"] == "pass", verdict
    assert "disk-content" in verdict["stages_ms"] and disk_notes(verdict) == []
    assert dom.info()[0] == 1

    before, after = changed_root(xfs_guest, libvirt_env.workdir,
                                 "mkdir -p usr/local/bin; cp /usr/bin/true usr/local/bin/implant; "
                                 "chmod 755 usr/local/bin/implant")  # fmt: skip
    assert write_through_qemu(libvirt_env, dom, disk, before, after) > 0
    log = run_daemon_once(host)
    verdict = verdict_of(host, dom)
    assert verdict["status"] == "fail" and verdict["action"] == "pause", verdict
    assert [(f["kind"], f["path"]) for f in verdict["findings"]] == [
        ("unexpected-executable", "/usr/local/bin/implant")
    ]
    stats = disk_log(log, dom)["sets"][0]
    assert stats["mode"] == "incremental", stats
    print(f"xfs overlay change: {stats}")


def test_read_write_xfs_root_an_executable_the_guest_writes_is_found_never_missed(
    host: GuardedHost, signed_xfs: Path, libvirt_env: LibvirtEnv, xfs_guest: Guest
) -> None:
    dom = libvirt_env.define_guest(
        "xfs-drop", xfs_guest, disk_path=libvirt_env.overlay(signed_xfs, "xfs-drop.qcow2"),
        cmdline_extra="hostguard.rw=1 hostguard.run=/usr/local/bin/drop",
    )  # fmt: skip
    dom.create()
    libvirt_env.wait_for_console(dom, "HOSTGUARD-DROPPED", timeout=180)
    started = time.monotonic()
    unavailable: list[str] = []
    verdict: dict[str, Any] = {}
    while time.monotonic() - started < POLL_SECONDS:
        run_daemon_once(host)
        verdict = verdict_of(host, dom)
        assert verdict["status"] != "pass", verdict  # never a silent pass while the log holds the change
        found = [(f["kind"], f["path"], f["found"]) for f in verdict["findings"]]
        if any(kind != "check-unavailable" for kind, _, _ in found):
            break
        assert found and all("xfs log not clean" in why for _, _, why in found), verdict
        unavailable.append(found[0][2])
        time.sleep(15)
    print(f"xfs rw root: {len(unavailable)} check(s) 'xfs log not clean' before the finding, "
          f"{time.monotonic() - started:.0f} s; first: {unavailable[:1]}")  # fmt: skip
    assert [(f["kind"], f["path"]) for f in verdict["findings"]] == [
        ("unexpected-executable", "/usr/local/bin/dropped")
    ], verdict


def _files(reader: FastReader) -> tuple[FileEntry, ...]:
    return inventory(reader).files


def _recovered_files(overlay: Path, base: Path, work: Path) -> tuple[FileEntry, ...]:
    """The overlay's view after the host kernel's XFS log recovery (flatten, loop mount, unmount)."""
    raw = work / f"{overlay.stem}-flat.raw"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", overlay, raw], check=True)
    mnt = work / f"{overlay.stem}-flat.mnt"
    mnt.mkdir(exist_ok=True)
    imgs.run("mount", "-o", "loop", raw, mnt)
    imgs.run("umount", mnt)
    with FastReader([ImageSpec(raw, "raw")]) as reader:
        assert isinstance(reader, FastReader)
        return _files(reader)


@pytest.mark.parametrize("shape", ["destroyed-mid-write", "quiesced"])
def test_the_guest_kernels_log_is_read_as_recovered_or_refused(
    shape: str, signed_xfs: Path, libvirt_env: LibvirtEnv, xfs_guest: Guest
) -> None:
    base = signed_xfs  # the module's hook is installed: the start goes through it (a fresh overlay, signed base)
    overlay = libvirt_env.overlay(base, f"xfs-{shape}.qcow2")
    if shape == "quiesced":  # the flag file, written into the overlay before boot
        before, after = changed_root(xfs_guest, libvirt_env.workdir, ": > etc/xfs-quiesce")
        qemu_io_write(overlay, "qcow2", after, diff_ranges(before, after, 4096), libvirt_env.workdir)
    run = "hostguard.rw=1 hostguard.run=/usr/local/bin/xfs-writer"
    dom = libvirt_env.define_guest(f"xfs-{shape}", xfs_guest, disk_path=overlay, cmdline_extra=run)
    dom.create()
    libvirt_env.wait_for_console(dom, "XTEST-QUIET" if shape == "quiesced" else "XTEST-WRITING", timeout=240)
    time.sleep(5)
    dom.destroy()
    oracle = _recovered_files(overlay, base, libvirt_env.workdir)
    assert "/var/w/tool" in {f.path for f in oracle}
    chain = open_chain([layer(overlay, "qcow2"), layer(base, "qcow2")])
    try:
        with FastReader(disks=[chain]) as view:
            assert isinstance(view, FastReader)
            got = _files(view)
    except UnsupportedLayout as err:
        assert "xfs log not clean" in err.message, err.message
        print(f"{shape}: refused: {err.message}")
        assert shape == "destroyed-mid-write", "a quiesced log must read"
        return
    assert got == oracle
    print(f"{shape}: read, identical to the recovered filesystem ({len(got)} files)")
