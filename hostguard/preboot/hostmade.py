"""Disks a stack makes on the host, which no producer can sign (issue 15, docs/adr/0016-stack-profiles.md).

With `[policy] profile = "nova"` a disk that is not signed may still start when its bytes show it is exactly one
of the disks Nova makes itself: the config drive (ISO 9660 labelled `config-2`, not El Torito bootable, one raw
layer), a fresh ephemeral filesystem (ext2/3/4 never mounted, no file but lost+found, empty boot block) or a
swap area (mkswap's header, empty boot block) as the raw base of the disk. File names are never looked at. The
disk must not be bootable ahead of the signed disk. Light on purpose: the hook imports it only under the profile.

With `profile = "kubevirt"` the one host-made disk is virt-launcher's cloud-init NoCloud seed (`noCloud.iso`): ISO
9660 or vfat labelled `cidata`, one raw layer. Nova's `config_drive_format = vfat` makes a vfat `config-2`.
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
NOCLOUD_LABEL = b"cidata"  # cloud-init's NoCloud datasource (KubeVirt's cloudInitNoCloud volume)
FAT_SECTOR = 512
EXT_SUPERBLOCK = 1024
EXT_MAGIC = 0xEF53
SWAP_PAGE = 4096  # x86-64: mkswap's signature ends the first page
SWAP_MAGIC = b"SWAPSPACE2"


def _pread(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise DomainError(f"cannot read at offset {offset}: {exc.strerror}") from None


def config_drive_problem(fd: int, expected: bytes = CONFIG_DRIVE_LABEL) -> str | None:
    """None when the file is an ISO 9660 image labelled `expected` without an El Torito boot record."""
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
    if label is None or label.lower() != expected:
        shown = "none" if label is None else repr(label.decode("ascii", "replace"))
        return f"its volume label is {shown}, not '{expected.decode()}'"
    return None


def vfat_problem(fd: int, expected: bytes) -> str | None:
    """None when the file is a FAT12/16/32 volume (no partition table) whose boot sector's label is `expected`
    (case-insensitive, as cloud-init matches it). Its boot code is mkfs.fat's "not a bootable disk" stub or
    anything else: what keeps it from booting is check_not_bootable (never ahead of the signed disk)."""
    sector = _pread(fd, FAT_SECTOR, 0)
    if len(sector) < FAT_SECTOR or sector[510:512] != b"\x55\xaa":
        return "not a FAT volume (no boot sector signature)"
    bytes_per_sector, per_cluster = struct.unpack_from("<H", sector, 11)[0], sector[13]
    reserved, fats = struct.unpack_from("<H", sector, 14)[0], sector[16]
    if bytes_per_sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or per_cluster & (per_cluster - 1):
        return "not a FAT volume (its BIOS parameter block is not one)"
    if reserved == 0 or fats == 0:
        return "not a FAT volume (no reserved sector or no FAT)"
    fat32 = struct.unpack_from("<H", sector, 22)[0] == 0  # FAT32 keeps its FAT size in the extended BPB
    ext = 64 if fat32 else 36  # extended BPB: drive number, reserved, signature, serial, label, type
    if sector[ext + 2] not in (0x28, 0x29):
        return "not a FAT volume (no extended boot signature)"
    kind = sector[ext + 18 : ext + 26].rstrip(b" ")
    if kind not in ((b"FAT32",) if fat32 else (b"FAT12", b"FAT16", b"FAT")):
        return f"not a FAT volume (file system type {kind.decode('ascii', 'replace')!r})"
    label = sector[ext + 7 : ext + 18].rstrip(b" ")
    if label.lower() != expected:
        return f"its volume label is {label.decode('ascii', 'replace')!r}, not '{expected.decode()}'"
    return None


def _seed_problem(fd: int, expected: bytes) -> str | None:
    """ISO 9660 or vfat labelled `expected` (a config drive, a NoCloud seed)."""
    iso = config_drive_problem(fd, expected)
    if iso is None:
        return None
    fat = vfat_problem(fd, expected)
    if fat is None:
        return None
    return iso if "not an ISO 9660 image" not in iso else fat if "not a FAT volume" not in fat else f"{iso}; {fat}"


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


def classify(disk: DiskSpec, layers: list[tuple[Path, str, int]], profile: str = "nova") -> tuple[str, str | None]:
    """(kind, problem) of the disk's bottom layer: kind names what it could be, problem is None when it is."""
    path, fmt, fd = layers[-1]
    del path
    if profile == "kubevirt":
        if len(layers) != 1 or fmt != "raw":
            return "KubeVirt NoCloud seed", "a NoCloud seed is one raw file"
        return "KubeVirt NoCloud seed", _seed_problem(fd, NOCLOUD_LABEL)
    if disk.device == "cdrom":
        if len(layers) != 1 or fmt != "raw":
            return "Nova config drive", "a config drive is one raw file"
        return "Nova config drive", _seed_problem(fd, CONFIG_DRIVE_LABEL)
    if fmt != "raw":
        return "Nova ephemeral or swap base", "its base is not raw"
    if (swap := swap_problem(fd)) is None:
        return "Nova swap base", None
    if (eph := ephemeral_problem(fd)) is None:
        return "Nova ephemeral base", None
    if len(layers) == 1 and _seed_problem(fd, CONFIG_DRIVE_LABEL) is None:
        return "Nova config drive", None
    return "Nova ephemeral or swap base", f"{eph}; {swap}"
