"""Containers whose files the inventory cannot see must fail it, naming what could not be read, never give a
partial manifest (issue 19: a disk whose LVM metadata is corrupt, label intact, gave exit 0 and a manifest of
the /boot files only). Images are built inside libguestfs's appliance (LVM and LUKS without host loop
devices), then inventoried the way `hostguard manifest create` does (reader "auto": libguestfs for these)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs.inventory import inventory
from hostguard.imagefs.readers import open_reader
from tests.testbed.prereq import require, require_root, require_tool

pytestmark = pytest.mark.integration

MIB = 1 << 20
SECTOR = 512
BOOT_SECTORS = 32 * MIB // SECTOR
PART2_START = 2048 + BOOT_SECTORS  # in sectors


def _appliance(*disks: Path) -> Any:
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    g.set_network(False)
    for disk in disks:
        g.add_drive_opts(str(disk), format="raw")
    g.launch()
    return g


def _files(g: Any, dev: str, files: dict[str, tuple[bytes, int]]) -> None:
    g.mkfs("ext4", dev)
    g.mount(dev, "/")
    for path, (data, mode) in files.items():
        g.mkdir_p(os.path.dirname(path))
        g.write(path, data)
        g.chmod(mode, path)
    g.umount_all()


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GPT disks: partition 1 an ext4 /boot, partition 2 an LVM physical volume (VG hgvg, LV root holding an
    executable) or a LUKS volume."""
    require_root()
    require(importlib.util.find_spec("guestfs") is not None, "python3-guestfs is not importable")
    require_tool("qemu-system-x86_64")
    d = tmp_path_factory.mktemp("containers")
    out = {name: d / f"{name}.raw" for name in ("lvm", "luks")}
    for path in out.values():
        with path.open("wb") as fh:
            fh.truncate(160 * MIB)
    g = _appliance(*out.values())
    try:
        for dev in ("/dev/sda", "/dev/sdb"):
            g.part_init(dev, "gpt")
            g.part_add(dev, "p", 2048, PART2_START - 1)
            g.part_add(dev, "p", PART2_START, -34)
            _files(
                g, dev + "1", {"/vmlinuz-6.1.0": (b"kernel image\n" * 100, 0o644), "/grub/x": (b"#!/bin/sh\n", 0o755)}
            )
        g.pvcreate("/dev/sda2")
        g.vgcreate("hgvg", ["/dev/sda2"])
        g.lvcreate("root", "hgvg", 64)
        _files(g, "/dev/hgvg/root", {"/usr/bin/tool": (b"#!/bin/sh\necho tool\n", 0o755)})
        g.luks_format("/dev/sdb2", "hostguard-test-key", 0)
        g.shutdown()
    finally:
        g.close()
    corrupt = d / "lvm-corrupt.raw"
    shutil.copyfile(out["lvm"], corrupt)
    pv = PART2_START * SECTOR
    with corrupt.open("r+b") as fh:
        fh.seek(pv + SECTOR)
        assert fh.read(8) == b"LABELONE"  # the label stays intact
        fh.seek(pv + 4096 + SECTOR)  # the metadata text after the area's header: its checksum breaks
        fh.write(b"\xaa" * 8192)
    out["lvm-corrupt"] = corrupt
    return out


def _paths(disk: Path, reader_choice: str = "auto") -> set[str]:
    with open_reader([(disk, "raw")], reader_choice) as reader:
        return {f.path for f in inventory(reader).files}


def test_a_healthy_lvm_disk_is_inventoried_with_its_logical_volume(disks: dict[str, Path]) -> None:
    paths = _paths(disks["lvm"])
    assert any(p.endswith("/usr/bin/tool") for p in paths), paths
    assert any(p.endswith("/grub/x") for p in paths), paths


def test_corrupt_lvm_metadata_fails_the_inventory_naming_the_physical_volume(disks: dict[str, Path]) -> None:
    # libguestfs (the kernel's LVM) and the fast reader (linear LVM2, issue 19) each name the physical volume.
    with pytest.raises(ImageError, match=r"/dev/sda2: an LVM2 physical volume \(LVM2_member\) whose volume group"):
        _paths(disks["lvm-corrupt"], "guestfs")
    with pytest.raises(ImageError, match=r"lvm-corrupt.raw \(partition 2\): LVM2 physical volume: metadata checksum"):
        _paths(disks["lvm-corrupt"], "auto")


def test_an_encrypted_volume_fails_the_inventory_naming_it(disks: dict[str, Path]) -> None:
    with pytest.raises(ImageError, match=r"/dev/sda2: a LUKS-encrypted volume \(crypto_LUKS\)"):
        _paths(disks["luks"])
