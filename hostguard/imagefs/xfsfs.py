"""XFS for the fast reader: dissect.xfs parses the on-disk structures, this module bounds and checks them.

dissect.xfs (superblock, allocation groups, inodes, directories, extent lists) is a forensic parser: it
trusts what it reads. Around it, we bound every loop by the reader's `Limits` (directory size, extent
count, nodes, path length), check each extent against the volume before reading it, read unwritten
(preallocated) extents as zeros as the kernel does (dissect reads them as data), parse the inode's
short-form attribute fork ourselves for `security.capability` (dissect.xfs has no xattr support) and
read content with `os.pread` through the volume's segments. What we do not read is refused with
`UnsupportedLayout` (so "auto" uses libguestfs) and named: realtime files, directory blocks larger than
filesystem blocks, attributes outside the inode. Malformed structures are `ImageError`s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from hostguard.errors import ImageError
from hostguard.imagefs import HEAD_BYTES, FilesystemInfo, Limits, UnsupportedLayout
from hostguard.imagefs.disk import OffsetReader, Segment, plan_segments, zero_chunks
from hostguard.imagefs.extmap import path_text
from hostguard.imagefs.partitions import Volume
from hostguard.imagefs.pathwalk import NodeStat, TreeFs
from hostguard.imagefs.xfslog import LogState, check_log

XFS_MAGIC = b"XFSB"
FMT_DEV, FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 0, 1, 2, 3
ATTR_ROOT, ATTR_SECURE = 0x02, 0x04  # short-form attribute namespaces (trusted., security.)
DIFLAG_REALTIME = 0x1
MAX_BLOCK_SIZE = 65536
MAX_INODE_SIZE = 2048


_p = path_text


def _dissect_error() -> type[Exception]:
    from dissect.xfs.exceptions import Error

    return Error  # type: ignore[no-any-return]


def _guarded(items: Iterator[Any], label: str, where: bytes) -> Iterator[Any]:
    """`items` with dissect.xfs's own errors (corrupt structures it noticed) as `ImageError`s."""
    try:
        yield from items
    except _dissect_error() as err:
        raise ImageError(f"{label}: {_p(where)}: {err}") from None


class VolumeFile(OffsetReader):
    """Over a volume (what dissect.xfs and dissect.volume's LVM read through)."""

    def __init__(self, volume: Volume) -> None:
        super().__init__(volume.size)
        self._volume = volume

    def read_at(self, offset: int, length: int) -> bytes:
        return self._volume.read(offset, length)


class XfsFilesystem(TreeFs[Any]):
    """One XFS filesystem. Construction validates the superblock and refuses what it cannot read."""

    def __init__(self, volume: Volume, limits: Limits) -> None:
        from dissect.xfs import xfs as dxfs

        self.volume = volume
        self.limits = limits
        self.label = volume.label
        head = volume.read(0, 512)
        if head[:4] != XFS_MAGIC:
            raise ImageError(f"{self.label}: no XFS superblock")
        block_size, agblocks, agcount = struct.unpack_from(">I", head, 4)[0], *struct.unpack_from(">II", head, 84)
        inode_size = struct.unpack_from(">H", head, 104)[0]
        if block_size < 512 or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise self._corrupt(f"invalid block size {block_size}")
        if inode_size < 256 or inode_size > MAX_INODE_SIZE or inode_size & (inode_size - 1):
            raise self._corrupt(f"invalid inode size {inode_size}")
        if agcount == 0 or agblocks == 0 or (agcount - 1) * agblocks * block_size >= volume.size:
            raise self._corrupt("allocation groups outside the volume")
        dirblklog = head[192]
        if dirblklog:
            raise UnsupportedLayout(f"{self.label}: XFS directory blocks larger than filesystem blocks")
        agblklog = head[124]
        if agblklog > 31 or (1 << agblklog) < agblocks:
            raise self._corrupt(f"invalid allocation group block log {agblklog}")
        self.block_size = int(block_size)
        try:
            self._xfs = dxfs.XFS(VolumeFile(volume))
        except _dissect_error() as err:
            raise ImageError(f"{self.label}: XFS: {err}") from None
        self.uuid = str(self._xfs.uuid)
        self.volume_label = self._xfs.sb.sb_fname.split(b"\x00")[0]
        self._agblocks = int(agblocks)
        self._agblklog: int = int(self._xfs.sb.sb_agblklog)
        self.sb = self._xfs.sb
        self.inode_size = int(inode_size)
        self.root_ino = int(self.sb.sb_rootino)
        # A change only in the log (a running or crashed guest) would be missed: refuse unless the kernel's
        # recovery would not change what we read (ADR 0023).
        self.log: LogState = check_log(self)

    def _corrupt(self, what: str) -> ImageError:
        return ImageError(f"{self.label}: an XFS filesystem (xfs) with a corrupt superblock: {what}")

    def info(self) -> FilesystemInfo:
        return self.volume.filesystem_info("xfs", self.uuid, self.volume_label)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the volume as this reader sees the filesystem (the log is never replayed: `imagefs.xfslog`)."""
        return self.volume.read(offset, length)

    def fs_block(self, fsb: int, where: bytes) -> int:
        """The volume block of XFS filesystem block number `fsb` (AG number and block in it), checked."""
        ag, blk = fsb >> self._agblklog, fsb & ((1 << self._agblklog) - 1)
        if blk >= self._agblocks or (ag * self._agblocks + blk + 1) * self.block_size > self.volume.size:
            raise ImageError(f"{self.label}: {_p(where)}: block {fsb} outside the filesystem")
        return ag * self._agblocks + blk

    def inode_offset(self, ino: int) -> int:
        """Where inode `ino` lies in the volume: XFS inode numbers are locations (AG, block, slot)."""
        inopblog = int(self.sb.sb_inopblog)
        block = self.fs_block(ino >> inopblog, b"<inode %d>" % ino)
        return block * self.block_size + (ino & ((1 << inopblog) - 1)) * self.inode_size

    def map_blocks(self, node: Any, where: bytes) -> list[int]:
        """The volume blocks of the data fork's extent B+tree (format "btree"): what mapping the extents reads
        besides the inode. Bounded by `max_extents` nodes."""
        d = node.inode
        if d.di_format != FMT_BTREE:
            return []
        fork = node.datafork()
        raw = fork.read()
        if len(raw) < 4:
            raise ImageError(f"{self.label}: {_p(where)}: truncated extent B+tree root")
        numrecs = struct.unpack_from(">H", raw, 2)[0]
        maxrecs = (len(raw) - 4) // 16
        if numrecs > maxrecs:
            raise ImageError(f"{self.label}: {_p(where)}: extent B+tree root with {numrecs} records")
        todo = list(struct.unpack_from(f">{numrecs}Q", raw, 4 + maxrecs * 8))
        header = 72 if self._xfs._has_crc else 24
        per_node = (self.block_size - header) // 16
        out: list[int] = []
        while todo:
            block = self.fs_block(todo.pop(), where)
            out.append(block)
            if len(out) > self.limits.max_extents:
                raise ImageError(f"{self.label}: {_p(where)}: more than {self.limits.max_extents} B+tree blocks")
            data = self.read(block * self.block_size, self.block_size)
            level, n = struct.unpack_from(">HH", data, 4)
            if level and n > per_node:
                raise ImageError(f"{self.label}: {_p(where)}: extent B+tree node with {n} records")
            if level:
                todo += struct.unpack_from(f">{n}Q", data, header + per_node * 8)
        return out

    # --- inodes ----------------------------------------------------------------------------------------

    def inode(self, ino: int, where: bytes) -> Any:
        try:
            node = self._xfs.get_inode(ino)
            d = node.inode  # parses and checks the magic
        except _dissect_error() as err:
            raise ImageError(f"{self.label}: {_p(where)}: inode {ino}: {err}") from None
        if d.di_format not in (FMT_DEV, FMT_LOCAL, FMT_EXTENTS, FMT_BTREE):
            raise ImageError(f"{self.label}: {_p(where)}: inode {ino} has data fork format {d.di_format}")
        if d.di_flags & DIFLAG_REALTIME:
            raise UnsupportedLayout(f"{self.label}: {_p(where)}: XFS realtime file")
        return node

    def content_runs(self, node: Any, where: bytes) -> Iterator[tuple[int | None, int]]:
        """(byte offset in the volume or None for zeros, length) runs covering the file's size."""
        d = node.inode
        size = d.di_size
        if size > self.limits.max_file_bytes:
            raise ImageError(f"{self.label}: {_p(where)}: size {size} exceeds the limit")
        if d.di_format not in (FMT_EXTENTS, FMT_BTREE):
            raise ImageError(f"{self.label}: {_p(where)}: regular file with data fork format {d.di_format}")
        bs = self.block_size
        pos = 0
        extents = _guarded(node._iter_blocks(), self.label, where)
        for count, (offset, block, length, unwritten) in enumerate(extents, start=1):
            if count > self.limits.max_extents:
                raise ImageError(f"{self.label}: {_p(where)}: more than {self.limits.max_extents} extents")
            start = offset * bs
            if start < pos or length == 0:
                raise ImageError(f"{self.label}: {_p(where)}: overlapping or empty extent at file block {offset}")
            if start >= size:
                break
            if start > pos:
                yield None, start - pos
            n = min(length * bs, size - start)
            ag, blk = block >> self._agblklog, block & ((1 << self._agblklog) - 1)
            if blk >= self._agblocks:
                raise ImageError(f"{self.label}: {_p(where)}: extent block {block} outside its allocation group")
            disk = (ag * self._agblocks + blk) * bs
            if disk + length * bs > self.volume.size:
                raise ImageError(f"{self.label}: {_p(where)}: extent outside the volume")
            yield (None if unwritten else disk), n
            pos = start + n
        if pos < size:
            yield None, size - pos

    def read_chunks(self, node: Any, where: bytes) -> Iterator[bytes | memoryview]:
        for offset, length in self.content_runs(node, where):
            if offset is None:
                yield from zero_chunks(length)
            else:
                yield from self.volume.image.read_segments(self.volume.segments(offset, length))

    def content_segments(self, node: Any, where: bytes, limit: int) -> list[Segment] | None:
        return plan_segments(self.content_runs(node, where), self.volume.segments, limit)

    def read_all(self, node: Any, where: bytes, limit: int) -> bytes:
        size = node.inode.di_size
        if size > limit:
            raise ImageError(f"{self.label}: {_p(where)}: {size} bytes exceed the limit of {limit}")
        if node.inode.di_format == FMT_LOCAL:
            return bytes(node.datafork().read(size))
        return b"".join(bytes(c) for c in self.read_chunks(node, where))

    def head(self, node: Any, where: bytes) -> bytes:
        want = min(HEAD_BYTES, node.inode.di_size)
        out = b""
        for chunk in self.read_chunks(node, where):
            out += bytes(chunk[: want - len(out)])
            if len(out) >= want:
                break
        return out

    def capability(self, node: Any, where: bytes) -> bytes | None:
        """security.capability from the short-form attribute fork (in the inode), None if absent."""
        d = node.inode
        if d.di_forkoff == 0:
            return None
        if d.di_aformat == FMT_EXTENTS and node.attr_extents == 0:
            return None
        if d.di_aformat != FMT_LOCAL:
            raise UnsupportedLayout(f"{self.label}: {_p(where)}: XFS extended attributes outside the inode")
        raw = node.attrfork().read()
        if len(raw) < 4:
            raise ImageError(f"{self.label}: {_p(where)}: truncated attribute fork")
        total, n = struct.unpack_from(">HB", raw, 0)
        if total > len(raw):
            raise ImageError(f"{self.label}: {_p(where)}: attribute fork larger than the inode")
        pos, found = 4, None
        for _ in range(n):
            if pos + 3 > total:
                raise ImageError(f"{self.label}: {_p(where)}: truncated attribute entry")
            namelen, valuelen, flags = raw[pos], raw[pos + 1], raw[pos + 2]
            end = pos + 3 + namelen + valuelen
            if end > total:
                raise ImageError(f"{self.label}: {_p(where)}: attribute entry beyond the fork")
            name = raw[pos + 3 : pos + 3 + namelen]
            if flags & (ATTR_SECURE | ATTR_ROOT) == ATTR_SECURE and name == b"capability":
                found = raw[pos + 3 + namelen : end]
            pos = end
        return found

    # --- directories and walking -----------------------------------------------------------------------

    def dir_entries(self, node: Any, where: bytes) -> Iterator[tuple[bytes, int]]:
        if node.inode.di_size > self.limits.max_dir_bytes:
            raise ImageError(f"{self.label}: {_p(where)}: directory larger than {self.limits.max_dir_bytes} bytes")
        if node.inode.di_format not in (FMT_LOCAL, FMT_EXTENTS, FMT_BTREE):
            raise ImageError(f"{self.label}: {_p(where)}: directory with data fork format {node.inode.di_format}")
        if node.inode.di_format == FMT_LOCAL and node.inode.di_size > self.volume.image.size:
            raise ImageError(f"{self.label}: {_p(where)}: invalid short-form directory size")
        for child in _guarded(node.iterdir(), self.label, where):
            name = child.filename.encode(errors="surrogateescape")
            if name in (b".", b".."):
                continue
            if not name or b"/" in name or b"\x00" in name:
                raise ImageError(f"{self.label}: {_p(where)}: directory entry with an invalid name")
            yield name, child.inum

    def root_node(self) -> Any:
        return self.inode(self.root_ino, b"/")

    def mode_of(self, node: Any) -> int:
        return int(node.inode.di_mode)

    def ino_of(self, node: Any) -> int:
        return int(node.inum)

    @property
    def locator(self) -> str:
        return self.volume.locator

    def node_stat(self, node: Any, path: bytes) -> NodeStat:
        d = node.inode
        nlink = d.di_nlink if d.di_version >= 2 else d.di_onlink
        return NodeStat(d.di_mode, node.inum, d.di_uid, d.di_gid, d.di_size, nlink)
