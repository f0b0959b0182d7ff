"""Disks a stack makes on the host, which no producer can sign (issue 15, docs/adr/0016-stack-profiles.md).

With `[policy] profile = "nova"` a disk that is not signed may still start when its bytes show it is exactly one
of the disks Nova makes itself: the config drive (ISO 9660 labelled `config-2`, not El Torito bootable, one raw
layer), a fresh ephemeral filesystem (ext2/3/4 never mounted, no file but lost+found, empty boot block) or a
swap area (mkswap's header, empty boot block) as the raw base of the disk. File names are never looked at. The
disk must not be bootable ahead of the signed disk. Light on purpose: the hook imports it only under the profile.
"""

from __future__ import annotations

import os
import struct

from hostguard.errors import DomainError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from hostguard.domain.xmlparse import DiskSpec, DomainSpec

ISO_SECTOR = 2048
ISO_FIRST_DESCRIPTOR = 16 * ISO_SECTOR
ISO_MAX_DESCRIPTORS = 32
CONFIG_DRIVE_LABEL = b"config-2"
EXT_SUPERBLOCK = 1024
EXT_MAGIC = 0xEF53
SWAP_PAGE = 4096  # x86-64: mkswap's signature ends the first page
SWAP_MAGIC = b"SWAPSPACE2"


def _pread(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise DomainError(f"cannot read at offset {offset}: {exc.strerror}") from None


def config_drive_problem(fd: int) -> str | None:
    """None when the file is an ISO 9660 image labelled config-2 without an El Torito boot record."""
    label = None
    for i in range(ISO_MAX_DESCRIPTORS):
        desc = _pread(fd, ISO_SECTOR, ISO_FIRST_DESCRIPTOR + i * ISO_SECTOR)
        if len(desc) < ISO_SECTOR or desc[1:6] != b"CD001":
            return "not an ISO 9660 image"
        kind = desc[0]
        if kind == 0:
            return "an El Torito boot record makes it bootable"
        if kind == 1 and label is None:
            label = desc[40:72].rstrip(b" ")
        if kind == 255:
            break
    else:
        return "its ISO 9660 descriptor set does not end"
    if label != CONFIG_DRIVE_LABEL:
        shown = "none" if label is None else repr(label.decode("ascii", "replace"))
        return f"its volume label is {shown}, not 'config-2'"
    return None


def ephemeral_problem(fd: int) -> str | None:
    """None when the file is a freshly made ext2/3/4 filesystem: never mounted, no inode in use but the reserved
    ones and lost+found, nothing in the boot block."""
    head = _pread(fd, EXT_SUPERBLOCK + 1024, 0)
    if len(head) < EXT_SUPERBLOCK + 1024:
        return "too small for a filesystem"
    sb = head[EXT_SUPERBLOCK:]
    if struct.unpack_from("<H", sb, 56)[0] != EXT_MAGIC:
        return "not an ext2/3/4 filesystem"
    inodes, free = struct.unpack_from("<I", sb, 0)[0], struct.unpack_from("<I", sb, 16)[0]
    mtime, mounts = struct.unpack_from("<I", sb, 44)[0], struct.unpack_from("<H", sb, 52)[0]
    first_ino = struct.unpack_from("<I", sb, 84)[0] if struct.unpack_from("<I", sb, 76)[0] >= 1 else 11
    if mtime or mounts:
        return "its filesystem has been mounted: not freshly made"
    if free > inodes or inodes - free > first_ino:
        return f"its filesystem has {inodes - free} inodes in use: not freshly made"
    if any(head[:EXT_SUPERBLOCK]):
        return "its boot block is not empty"
    return None


def swap_problem(fd: int) -> str | None:
    """None when the file is a swap area as mkswap makes it: the signature, version 1, empty boot block."""
    page = _pread(fd, SWAP_PAGE, 0)
    if len(page) < SWAP_PAGE or page[SWAP_PAGE - len(SWAP_MAGIC) :] != SWAP_MAGIC:
        return "no mkswap signature"
    if struct.unpack_from("<I", page, 1024)[0] != 1:
        return "not a version 1 swap area"
    if any(page[:1024]):
        return "its boot block is not empty"
    return None


def check_not_bootable(spec: DomainSpec, disk: DiskSpec, signed_before: bool) -> None:
    """A host-made disk never boots ahead of the signed disk: no `<boot order>` of its own, a cdrom not before
    hd in `<os><boot>`, a disk after a signed disk in the XML (libvirt boots the first hd)."""
    what = f"disk {disk.target}"
    if any(b.owner == f"{disk.device} {disk.target}" for b in spec.boot_order):
        raise DomainError(f"{what}: a host-made disk must not have a boot order")
    devs = spec.os.boot_devs
    if disk.device == "cdrom" and "cdrom" in devs and ("hd" not in devs or devs.index("cdrom") < devs.index("hd")):
        raise DomainError(f"{what}: <os><boot dev='cdrom'> would boot the host-made disk before the signed disk")
    if disk.device == "disk" and not signed_before and not spec.boot_order:
        raise DomainError(f"{what}: a host-made disk comes before the signed disk and would boot first")


def classify(disk: DiskSpec, layers: list[tuple[Path, str, int]]) -> tuple[str, str | None]:
    """(kind, problem) of the disk's bottom layer: kind names what it could be, problem is None when it is."""
    path, fmt, fd = layers[-1]
    del path
    if disk.device == "cdrom":
        if len(layers) != 1 or fmt != "raw":
            return "Nova config drive", "a config drive is one raw file"
        return "Nova config drive", config_drive_problem(fd)
    if fmt != "raw":
        return "Nova ephemeral or swap base", "its base is not raw"
    if (swap := swap_problem(fd)) is None:
        return "Nova swap base", None
    if (eph := ephemeral_problem(fd)) is None:
        return "Nova ephemeral base", None
    if config_drive_problem(fd) is None:
        return "Nova config drive", None
    return "Nova ephemeral or swap base", f"{eph}; {swap}"
