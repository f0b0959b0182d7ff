"""The ext2/3/4 superblock: the fields this reader uses, parsed with `struct` at the kernel's offsets.

Why not dissect.extfs's parser: importing it compiles its whole C structure set (~60 ms, in every inventory
and every post-start disk check), and the reader takes nothing else from it. The checks are those
dissect.extfs made (magic, inode count, per-group counts, block size, bigalloc) plus the rest in
`ExtFilesystem`; offsets are from the kernel's `struct ext4_super_block` (fs/ext4/ext4.h).
"""

from __future__ import annotations

import struct

from hostguard.record import Record

SUPERBLOCK_BYTES = 1024
EXT_MAGIC = 0xEF53
EXT_MIN_BLOCK_LOG = 10  # block size = 1024 << s_log_block_size


class SuperblockError(ValueError):
    """Not an ext superblock, or one no kernel would mount. The message says which field."""


class BigallocError(SuperblockError):
    """Clusters larger than blocks (bigalloc): a valid layout this reader does not implement."""


class Superblock(Record):
    s_inodes_count: int
    s_blocks_count_lo: int
    s_first_data_block: int
    s_log_block_size: int
    s_log_cluster_size: int
    s_blocks_per_group: int
    s_inodes_per_group: int
    s_magic: int
    s_rev_level: int
    s_inode_size: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_volume_name: bytes
    s_journal_inum: int
    s_desc_size: int
    s_first_meta_bg: int
    s_blocks_count_hi: int
    s_backup_bgs: tuple[int, int]
    s_checksum_seed: int


# (field, struct format, offset) in the 1024-byte superblock, little endian.
_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("s_inodes_count", "I", 0x00),
    ("s_blocks_count_lo", "I", 0x04),
    ("s_first_data_block", "I", 0x14),
    ("s_log_block_size", "I", 0x18),
    ("s_log_cluster_size", "I", 0x1C),
    ("s_blocks_per_group", "I", 0x20),
    ("s_inodes_per_group", "I", 0x28),
    ("s_magic", "H", 0x38),
    ("s_rev_level", "I", 0x4C),
    ("s_inode_size", "H", 0x58),
    ("s_feature_compat", "I", 0x5C),
    ("s_feature_incompat", "I", 0x60),
    ("s_feature_ro_compat", "I", 0x64),
    ("s_uuid", "16s", 0x68),
    ("s_volume_name", "16s", 0x78),
    ("s_journal_inum", "I", 0xE0),
    ("s_desc_size", "H", 0xFE),
    ("s_first_meta_bg", "I", 0x104),
    ("s_blocks_count_hi", "I", 0x150),
    ("s_backup_bgs", "2I", 0x24C),
    ("s_checksum_seed", "I", 0x270),
)


def parse_superblock(raw: bytes) -> Superblock:
    """Parse and sanity-check the 1024 superblock bytes (volume offset 1024). SuperblockError."""
    if len(raw) < SUPERBLOCK_BYTES:
        raise SuperblockError(f"only {len(raw)} bytes, a superblock has {SUPERBLOCK_BYTES}")
    values: dict[str, object] = {}
    for name, fmt, offset in _FIELDS:
        got = struct.unpack_from("<" + fmt, raw, offset)
        values[name] = got if len(got) > 1 else got[0]
    sb = Superblock(**values)  # type: ignore[arg-type]
    if sb.s_magic != EXT_MAGIC:
        raise SuperblockError(f"magic {sb.s_magic:#x} is not {EXT_MAGIC:#x} (not an ext filesystem)")
    if sb.s_inodes_count < 10:
        raise SuperblockError(f"inode count {sb.s_inodes_count} < 10")
    if sb.s_blocks_per_group == 0 or sb.s_inodes_per_group == 0:
        raise SuperblockError("blocks or inodes per group is 0")
    if sb.s_log_block_size != sb.s_log_cluster_size:
        raise BigallocError("bigalloc (clusters larger than blocks)")
    return sb
