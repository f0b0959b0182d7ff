"""XFS's part of the incremental disk check (`imagefs.indexing`).

XFS inode numbers are locations (allocation group, block, slot), so an indexed inode's bytes are found from
its number: no inode tables. A directory's entries and a file's content depend on its data-fork extents and,
for the "btree" format, the extent B+tree's blocks. The log is not replayed in memory: the view is read only
when the kernel's recovery would not change what the inventory reads (`imagefs.xfslog`, ADR 0023).
"""

from __future__ import annotations

import bisect
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hostguard.imagefs.disk import block_pairs
from hostguard.imagefs.xfsfs import XfsFilesystem

if TYPE_CHECKING:
    from hostguard.imagefs.diskindex import FsIndex

# Byte ranges of an on-disk inode (struct xfs_dinode) that change without anything the inventory reads
# changing: the access time, the unlinked-list pointer, and v3's CRC, change counter and LSN.
_V2_MASK = ((0x1E, 0x20), (0x20, 0x28), (0x60, 0x64))  # di_flushiter, di_atime, di_next_unlinked
_V3_MASK = ((0x20, 0x28), (0x60, 0x78))  # di_atime, di_next_unlinked .. di_lsn (crc, changecount)
_CORE = {2: 0x64, 3: 0xB0}  # where the data fork starts


class XfsIndexing:
    def geometry(self, fs: XfsFilesystem) -> list[int]:
        sb = fs.sb
        return [
            fs.volume.offset,
            fs.volume.size,
            fs.block_size,
            int(sb.sb_dblocks),
            int(sb.sb_agcount),
            int(sb.sb_agblocks),
            int(sb.sb_agblklog),
            fs.inode_size,
            int(sb.sb_inopblog),
            int(sb.sb_versionnum),
            int(sb.sb_features2),
            int(sb.sb_features_compat),
            int(sb.sb_features_ro_compat),
            int(sb.sb_features_incompat),
            fs.root_ino,
            int(sb.sb_logstart),
            int(sb.sb_logblocks),
        ]

    def inode_tables(self, fs: XfsFilesystem) -> list[int]:
        return []

    def root_ino(self, fs: XfsFilesystem) -> int:
        return fs.root_ino

    def ino(self, inode: Any) -> int:
        return int(inode.inum)

    def is_dir(self, inode: Any) -> bool:
        return stat.S_ISDIR(inode.inode.di_mode)

    def replayed_blocks(self, fs: XfsFilesystem) -> Iterable[int]:
        return ()

    def dependencies(self, fs: XfsFilesystem, inode: Any, where: bytes) -> list[int]:
        if inode.inode.di_format not in (2, 3):  # local (in the inode) or device: nothing outside the inode
            return []
        out = block_pairs(fs.content_runs(inode, where), fs.block_size)
        for block in fs.map_blocks(inode, where):
            out += [block, 1]
        return out

    def changed_inodes(
        self, view: XfsFilesystem, base: XfsFilesystem, idx: FsIndex, intervals: list[tuple[int, int]],
        counter: list[int],
    ) -> set[int]:  # fmt: skip
        bs, isz = view.block_size, view.inode_size
        if idx.located is None:  # once per index: its geometry is the view's (checked before)
            pairs = sorted((view.inode_offset(ino), ino) for ino in idx.kinds)
            idx.located = ([o for o, _ in pairs], [i for _, i in pairs])
        offsets, inos = idx.located
        out: set[int] = set()
        for s, e in intervals:
            i = bisect.bisect_left(offsets, s * bs)
            block_cache: dict[int, tuple[bytes, bytes]] = {}
            while i < len(offsets) and offsets[i] < e * bs:
                offset, ino = offsets[i], inos[i]
                i += 1
                blk = offset // bs
                if blk not in block_cache:
                    counter[0] += 1
                    block_cache = {blk: (view.read(blk * bs, bs), base.read(blk * bs, bs))}
                new, old = block_cache[blk]
                within = offset - blk * bs
                if new != old and _masked(new, within, isz) != _masked(old, within, isz):
                    out.add(ino)
        return out

    def same_content(self, base: XfsFilesystem, view: XfsFilesystem, old: Any, new: Any) -> bool:
        return _content_key(base, old) == _content_key(view, new)


XFS = XfsIndexing()


def _masked(block: bytes, off: int, size: int) -> bytes:
    raw = bytearray(block[off : off + size])
    for lo, hi in _V3_MASK if raw[4] >= 3 else _V2_MASK:
        raw[lo:hi] = bytes(hi - lo)
    return bytes(raw)


def _content_key(fs: XfsFilesystem, node: Any) -> bytes:
    """What a regular file's content is read through: format, size, extent counts and the data fork."""
    raw = fs.read(fs.inode_offset(int(node.inum)), fs.inode_size)
    start = _CORE.get(raw[4], 0x64)
    forkoff = raw[0x52] * 8
    end = start + forkoff if forkoff else len(raw)
    return raw[5:6] + raw[0x18:0x20] + raw[0x38:0x40] + raw[0x4C:0x50] + raw[start:end]
