"""ext2/3/4's part of the incremental disk check (`imagefs.indexing`): inode tables at fixed places, the
journal replayed in memory (`ExtFilesystem.remap`), dependencies from the block map."""

from __future__ import annotations

import bisect
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hostguard.imagefs.disk import block_pairs
from hostguard.imagefs.extfs import GOOD_OLD_INODE_SIZE, INLINE_DATA_FL, ROOT_INO, ExtFilesystem
from hostguard.imagefs.extmap import EXTENTS_FL, Inode

if TYPE_CHECKING:
    from hostguard.imagefs.diskindex import FsIndex


class ExtIndexing:
    def geometry(self, fs: ExtFilesystem) -> list[int]:
        sb = fs.sb
        return [
            fs.volume.offset,
            fs.volume.size,
            fs.block_size,
            fs.block_count,
            fs.inode_size,
            fs.inodes_per_group,
            fs.inodes_count,
            fs.desc_size,
            int(sb.s_first_data_block),
            int(sb.s_blocks_per_group),
            fs.incompat & ~0x4,  # minus "needs recovery": a running guest's view has it, the base does not
            fs.ro_compat & ~0x10000,  # minus "orphans present" (the kernel's bookkeeping, not a format)
            fs.csum_seed,
        ]

    def inode_tables(self, fs: ExtFilesystem) -> list[int]:
        return [fs.inode_table(g) for g in range(fs.groups)]

    def root_ino(self, fs: ExtFilesystem) -> int:
        return ROOT_INO

    def ino(self, inode: Inode) -> int:
        return inode.ino

    def is_dir(self, inode: Inode) -> bool:
        return stat.S_ISDIR(inode.mode)

    def replayed_blocks(self, fs: ExtFilesystem) -> Iterable[int]:
        return fs.remap

    def dependencies(self, fs: ExtFilesystem, inode: Inode, where: bytes) -> list[int]:
        out: list[int] = []
        meta: list[int] = []
        if not inode.flags & INLINE_DATA_FL:
            out = block_pairs(fs.blockmap.content_runs(inode, where, meta), fs.block_size)
        for block in meta:
            out += [block, 1]
        if inode.file_acl:
            out += [inode.file_acl, 1]
        return out

    def changed_inodes(
        self, view: ExtFilesystem, base: ExtFilesystem, idx: FsIndex, intervals: list[tuple[int, int]],
        counter: list[int],
    ) -> set[int]:  # fmt: skip
        tables, kinds = idx.inode_tables, idx.kinds
        out: set[int] = set()
        bs, isz, ipg = view.block_size, view.inode_size, view.inodes_per_group
        per_block = bs // isz
        table_blocks = -(-(ipg * isz) // bs)
        ordered = sorted((t, g) for g, t in enumerate(tables))
        starts = [t for t, _ in ordered]
        for s, e in intervals:
            i = max(0, bisect.bisect_right(starts, s) - 1)
            while i < len(ordered) and ordered[i][0] < e:
                t, g = ordered[i]
                for blk in range(max(s, t), min(e, t + table_blocks)):
                    counter[0] += 1
                    new, old = view.read(blk * bs, bs), base.read(blk * bs, bs)
                    if new == old:
                        continue
                    first = g * ipg + (blk - t) * per_block + 1
                    for slot in range(per_block):
                        ino = first + slot
                        if ino > view.inodes_count:
                            break
                        if ino in kinds and _masked(new, slot * isz, isz) != _masked(old, slot * isz, isz):
                            out.add(ino)
                i += 1
        return out

    def same_content(self, base: ExtFilesystem, view: ExtFilesystem, old: Inode, new: Inode) -> bool:
        mask = EXTENTS_FL | INLINE_DATA_FL
        if new.flags & INLINE_DATA_FL:
            return False
        return (old.size, old.flags & mask, old.block) == (new.size, new.flags & mask, new.block)


EXT = ExtIndexing()


def _masked(block: bytes, off: int, size: int) -> bytes:
    """An on-disk inode without what changes when nothing the inventory reads does: the access time and the
    checksums (which cover the access time)."""
    raw = bytearray(block[off : off + size])
    raw[0x08:0x0C] = b"\0\0\0\0"  # i_atime
    raw[0x7C:0x7E] = b"\0\0"  # i_checksum_lo
    if size > GOOD_OLD_INODE_SIZE:
        extra = int.from_bytes(raw[0x80:0x82], "little")
        if extra >= 4:
            raw[0x82:0x84] = b"\0\0"  # i_checksum_hi
        if extra >= 0x10:
            raw[0x8C:0x90] = b"\0\0\0\0"  # i_atime_extra
    return bytes(raw)
