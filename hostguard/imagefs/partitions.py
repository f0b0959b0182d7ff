"""Partition tables (MBR with logical partitions, GPT) and filesystem signatures, the way Linux reads them.

The on-disk structures come from dissect.volume (`c_mbr`, `c_gpt`); the traversal is ours because Linux's
rules decide what a guest (and libguestfs) sees: GPT checked by CRC with a fall-back to the backup header,
the full last LBA of a GPT partition included, logical partitions numbered from 5, EBR chains bounded.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

from hostguard.errors import ImageError
from hostguard.imagefs import FilesystemInfo
from hostguard.imagefs.disk import DiskImage, Segment
from hostguard.record import Record

SECTOR = 512
MAX_PARTITIONS = 256  # Linux DISK_MAX_PARTS
MAX_EBR_LOOPS = 100  # as Linux's parse_extended
MAX_GPT_ENTRIES_BYTES = 1 << 20
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
MBR_LINUX = 0x83
PROBE_BYTES = 69632  # up to and including the btrfs superblock magic at 64 KiB + 64

LINUX_DATA_GPT_TYPES = frozenset(
    {
        "0fc63daf-8483-4772-8e79-3d69d8477de4",  # Linux filesystem
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",  # root x86-64
        "44479540-f297-41b2-9af7-d131d5f0458a",  # root x86
        "b921b045-1df0-41c3-af44-4c6f280d3fae",  # root arm64
        "69dad710-2ce4-4e3c-b16c-21a1d49abed3",  # root arm
        "8484680c-9521-48c6-9c11-b0720656f69e",  # /usr x86-64
        "933ac7e1-2eb4-4f13-b844-0e14e2aef915",  # /home
        "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",  # /srv
        "4d21b016-b534-45c2-a9fb-5c16e091fd2d",  # /var
        "7ec6f557-3bc5-4aca-b293-16ef5df639d1",  # /var/tmp
        "bc13c2ff-59e6-4262-a352-b275fd6f7172",  # extended boot loader
    }
)
BIOS_BOOT_GPT_TYPE = "21686148-6449-6e6f-744e-656564454649"


class Volume(Record):
    """A byte range of one image holding (maybe) a filesystem: a partition or the whole disk."""

    image: DiskImage
    offset: int
    size: int
    number: int | None = None  # Linux partition number; None for the whole disk
    partuuid: str | None = None
    partlabel: str | None = None
    gpt_type: str | None = None
    mbr_type: int | None = None

    @property
    def locator(self) -> str:
        base = f"disk{self.image.index}"
        return base if self.number is None else f"{base}p{self.number}"

    @property
    def label(self) -> str:
        where = "whole disk" if self.number is None else f"partition {self.number}"
        return f"{self.image.label} ({where})"

    def filesystem_info(self, fstype: str, uuid: str | None, label: bytes | None) -> FilesystemInfo:
        """What a reader says of a filesystem of `fstype` on this volume (an empty `label`: None)."""
        return FilesystemInfo(
            locator=self.locator,
            fstype=fstype,
            image_index=self.image.index,
            partition=self.number,
            uuid=uuid,
            label=label or None,
            partuuid=self.partuuid,
            partlabel=self.partlabel,
            device=self.label,
        )

    @property
    def linux_data_type(self) -> bool:
        return self.gpt_type in LINUX_DATA_GPT_TYPES or self.mbr_type == MBR_LINUX

    def image_runs(self) -> tuple[tuple[int, int, int], ...]:
        """Where the volume lies on its image: (offset in the volume, offset in the image, length) runs."""
        return ((0, self.offset, self.size),)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(
                f"{self.label}: read of {length} bytes at offset {offset} is outside the volume ({self.size} bytes)"
            )

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.image.read(self.offset + offset, length)

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        self._check(offset, length)
        return self.image.segments(self.offset + offset, length)


def volumes(image: DiskImage) -> list[Volume]:
    """The partitions of `image` as Linux would list them, or the whole disk when it has no table."""
    head = image.read(0, min(SECTOR * 2, image.size))
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return [Volume(image, 0, image.size)]
    from dissect.volume.disk.schemes.mbr import c_mbr

    mbr = c_mbr.mbr_s(head[:SECTOR])
    if any(p.bootable not in (0x00, 0x80) for p in mbr.part):
        return [Volume(image, 0, image.size)]  # a boot sector of a filesystem, not a partition table
    if any(p.type == 0xEE for p in mbr.part):
        return _gpt(image)
    return _mbr(image, mbr)


def _mbr(image: DiskImage, mbr: Any) -> list[Volume]:
    out: list[Volume] = []
    disk_sectors = image.size // SECTOR
    parts = list(mbr.part)
    if all(p.type == 0 or p.sector_size == 0 for p in parts):
        return [Volume(image, 0, image.size)]
    extended = None
    for slot, p in enumerate(parts, start=1):
        if p.type == 0 or p.sector_size == 0:
            continue
        _check_extent(image, slot, p.sector_ofs, p.sector_size, disk_sectors)
        if p.type in EXTENDED_TYPES:
            if extended is None:
                extended = p.sector_ofs
            continue
        out.append(Volume(image, p.sector_ofs * SECTOR, p.sector_size * SECTOR, slot, mbr_type=p.type))
    if extended is not None:
        out.extend(_logical(image, extended, disk_sectors))
    return out


def _logical(image: DiskImage, ext_start: int, disk_sectors: int) -> Iterator[Volume]:
    from dissect.volume.disk.schemes.mbr import c_mbr

    number = 5
    this = ext_start
    seen: set[int] = set()
    for _ in range(MAX_EBR_LOOPS):
        if this in seen or this >= disk_sectors:
            return
        seen.add(this)
        sector = image.read(this * SECTOR, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            return
        ebr = c_mbr.mbr_s(sector)
        next_ebr = None
        for p in ebr.part:
            if p.type == 0 or p.sector_size == 0:
                continue
            if p.type in EXTENDED_TYPES:
                if next_ebr is None:
                    next_ebr = ext_start + p.sector_ofs
                continue
            if number >= MAX_PARTITIONS:
                return
            _check_extent(image, number, this + p.sector_ofs, p.sector_size, disk_sectors)
            yield Volume(image, (this + p.sector_ofs) * SECTOR, p.sector_size * SECTOR, number, mbr_type=p.type)
            number += 1
        if next_ebr is None:
            return
        this = next_ebr


def _check_extent(image: DiskImage, number: int, start: int, sectors: int, disk_sectors: int) -> None:
    if start + sectors > disk_sectors:
        raise ImageError(
            f"{image.label}: partition {number} (sectors {start}..{start + sectors - 1}) extends beyond the "
            f"disk ({disk_sectors} sectors): corrupt partition table"
        )


def _gpt(image: DiskImage) -> list[Volume]:
    disk_sectors = image.size // SECTOR
    found = _gpt_header(image, 1, disk_sectors)
    if found is None and disk_sectors > 2:
        found = _gpt_header(image, disk_sectors - 1, disk_sectors)
    if found is None:
        raise ImageError(f"{image.label}: offset 512: GPT header and its backup are corrupt (bad signature or CRC)")
    header, entries = found
    from dissect.volume.disk.schemes.gpt import c_gpt

    out: list[Volume] = []
    size = header.partition_entry_size
    for i in range(min(header.partition_table_count, MAX_PARTITIONS - 1)):
        raw = entries[i * size : i * size + 128]
        if raw[:16] == bytes(16):
            continue
        entry = c_gpt.GPT_PARTITION(raw)
        first, last = entry.first_lba, entry.last_lba
        if first > last or last >= disk_sectors:
            continue  # Linux skips entries that do not fit the disk
        name = raw[56:128].decode("utf-16-le", "replace").split("\x00", 1)[0]
        out.append(
            Volume(
                image,
                first * SECTOR,
                (last - first + 1) * SECTOR,
                i + 1,
                partuuid=str(UUID(bytes_le=bytes(entry.partition_guid))),
                partlabel=name,
                gpt_type=str(UUID(bytes_le=bytes(entry.type_guid))),
            )
        )
    return out


def _gpt_header(image: DiskImage, lba: int, disk_sectors: int) -> tuple[Any, bytes] | None:
    from dissect.volume.disk.schemes.gpt import c_gpt

    raw = image.read(lba * SECTOR, SECTOR)
    header = c_gpt.GPT_HEADER(raw)
    if header.signature != b"EFI PART" or not 92 <= header.header_size <= SECTOR:
        return None
    check = bytearray(raw[: header.header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header.crc32 or header.current_lba != lba:
        return None
    count, size = header.partition_table_count, header.partition_entry_size
    if size < 128 or size % 8 or count * size > MAX_GPT_ENTRIES_BYTES:
        return None
    start = header.lba_partition_array
    if start >= disk_sectors or start * SECTOR + count * size > image.size:
        return None
    entries = image.read(start * SECTOR, count * size)
    if zlib.crc32(entries) != header.partition_table_crc:
        return None
    return header, entries


# --- filesystem signatures ---------------------------------------------------------------------------------


def probe(volume: Volume) -> str:
    """The kind of content at the start of `volume`: "ext", "swap", "empty" (all zero), "unknown", or the
    name of a filesystem or container only libguestfs reads ("xfs", "btrfs", "vfat", "LVM2_member", ...),
    as blkid names them. Several signatures at once give "ambiguous"."""
    head = volume.read(0, min(PROBE_BYTES, volume.size))
    found = [name for name, match in _SIGNATURES if match(head)]
    if len(found) > 1:
        return "ambiguous:" + ",".join(found)
    if found:
        return found[0]
    if _zfs(volume):
        return "zfs_member"
    if head.count(0) == len(head):
        return "empty"
    return "unknown"


def describe(kind: str) -> str:
    """What a `probe` kind is, for a finding a reader of the log understands."""
    if kind.startswith("ambiguous:"):
        return f"several signatures at once ({kind.partition(':')[2]})"
    name = CONTENT_NAMES.get(kind)
    return f"{name} ({kind})" if name else kind


CONTENT_NAMES = {
    "ext": "an ext2/3/4 filesystem",
    "xfs": "an XFS filesystem",
    "btrfs": "a Btrfs filesystem",
    "vfat": "a FAT filesystem",
    "exfat": "an exFAT filesystem",
    "ntfs": "an NTFS filesystem",
    "LVM2_member": "an LVM2 physical volume",
    "crypto_LUKS": "a LUKS-encrypted volume",
    "linux_raid_member": "a Linux software RAID member",
    "zfs_member": "a ZFS pool member",
    "iso9660": "an ISO 9660 image",
    "squashfs": "a SquashFS image",
    "f2fs": "an F2FS filesystem",
    "erofs": "an EROFS image",
    "reiserfs": "a ReiserFS filesystem",
    "jfs": "a JFS filesystem",
    "bcachefs": "a bcachefs filesystem",
    "unknown": "no filesystem signature hostguard knows",
}


# A ZFS vdev label: its uberblock ring at 128 KiB (slots of 1 KiB or more) holds uberblocks whose first 8
# bytes are the magic 0x00bab10c in the writer's byte order (what blkid's zfs_member probe looks for).
ZFS_UBERBLOCK_RING = 128 << 10
ZFS_MAGICS = (struct.pack("<Q", 0x00BAB10C), struct.pack(">Q", 0x00BAB10C))


def _zfs(volume: Volume) -> bool:
    if volume.size < 2 * ZFS_UBERBLOCK_RING:
        return False
    ring = volume.read(ZFS_UBERBLOCK_RING, ZFS_UBERBLOCK_RING)
    return any(ring[o : o + 8] in ZFS_MAGICS for o in range(0, len(ring), 1024))


def _at(offset: int, magic: bytes) -> Callable[[bytes], bool]:
    return lambda b: b[offset : offset + len(magic)] == magic


def _ext(b: bytes) -> bool:
    return len(b) >= 1024 + 58 and struct.unpack_from("<H", b, 1024 + 56)[0] == 0xEF53


def _swap(b: bytes) -> bool:
    return any(b[p - 10 : p] in (b"SWAPSPACE2", b"SWAP-SPACE") for p in (4096, 8192, 16384, 65536))


def _fat(b: bytes) -> bool:
    return b[510:512] == b"\x55\xaa" and (b[54:59] == b"FAT12" or b[54:59] == b"FAT16" or b[82:87] == b"FAT32")


def _lvm(b: bytes) -> bool:
    return any(
        b[s * 512 : s * 512 + 8] == b"LABELONE" and b[s * 512 + 24 : s * 512 + 32] == b"LVM2 001" for s in range(4)
    )


def _md(b: bytes) -> bool:
    return any(b[o : o + 4] == b"\xfc\x4e\x2b\xa9" for o in (0, 4096))


_SIGNATURES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("ext", _ext),
    ("swap", _swap),
    ("vfat", _fat),
    ("exfat", _at(3, b"EXFAT   ")),
    ("ntfs", _at(3, b"NTFS    ")),
    ("xfs", _at(0, b"XFSB")),
    ("btrfs", _at(65536 + 64, b"_BHRfS_M")),
    ("LVM2_member", _lvm),
    ("crypto_LUKS", _at(0, b"LUKS\xba\xbe")),
    ("linux_raid_member", _md),
    ("iso9660", _at(32769, b"CD001")),
    ("squashfs", _at(0, b"hsqs")),
    ("f2fs", _at(1024, b"\x10\x20\xf5\xf2")),
    ("erofs", _at(1024, b"\xe2\xe1\xf5\xe0")),
    ("reiserfs", _at(65536 + 52, b"ReIsEr")),
    ("jfs", _at(32768, b"JFS1")),
    ("bcachefs", _at(4096 + 24, b"\xc6\x85\x73\xf6\x4e\x1a\x45\xca")),
)
