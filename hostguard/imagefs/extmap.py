"""Where an ext inode's content lives: extent trees (ext4) and block maps (ext2/3), bounded and checked.

`BlockMap.content_runs(inode)` yields (byte offset in the volume, or None for a hole / an uninitialized
extent, length) runs covering exactly the file size. Extent trees: depth at most 5 and decreasing by one per
level, entries within their node, extents sorted and not overlapping, physical blocks inside the filesystem.
Block maps: a zero pointer at any level is a hole covering its whole subtree. At most `max_extents` runs.
Reads go through the volume (`os.pread`): safe to use from several threads.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from hostguard.errors import ImageError
from hostguard.record import Record
from hostguard.signed.manifest import encode_path

EXTENTS_FL = 0x80000
EXTENT_MAGIC = 0xF30A
MAX_EXTENT_DEPTH = 5


class Inode(Record):
    ino: int
    mode: int  # full i_mode
    uid: int
    gid: int
    size: int
    links: int
    blocks: int  # i_blocks (512-byte units)
    flags: int
    block: bytes  # i_block, 60 bytes
    file_acl: int
    raw: bytes  # the whole on-disk inode


class BlockMap:
    def __init__(
        self,
        *,
        label: str,
        block_size: int,
        block_count: int,
        max_extents: int,
        read_block: Callable[[int, str, bytes], bytes],
    ) -> None:
        self.label = label
        self.block_size = block_size
        self.block_count = block_count
        self.max_extents = max_extents
        self._block = read_block

    def content_runs(
        self, inode: Inode, where: bytes, meta: list[int] | None = None
    ) -> Iterator[tuple[int | None, int]]:
        """(byte offset in the volume or None for zeros, length) runs covering the inode's size. With `meta`,
        the block numbers of the extent-tree or indirect blocks read on the way are appended to it."""
        size = inode.size
        if size == 0:
            return
        nblocks = -(-size // self.block_size)
        runs = (
            self._extent_runs(inode, nblocks, where, meta)
            if inode.flags & EXTENTS_FL
            else self._indirect_runs(inode, nblocks, where, meta)
        )
        remaining = size
        for count, (phys, blocks) in enumerate(runs, start=1):
            if count > self.max_extents:
                raise ImageError(f"{self.label}: {path_text(where)}: more than {self.max_extents} extents")
            n = min(blocks * self.block_size, remaining)
            yield (None if phys is None else phys * self.block_size, n)
            remaining -= n
            if remaining <= 0:
                return

    def _extent_runs(
        self, inode: Inode, nblocks: int, where: bytes, meta: list[int] | None
    ) -> Iterator[tuple[int | None, int]]:
        logical = 0
        for start, length, phys, init in self._extents(inode.block, None, 0, where, meta):
            if start < logical:
                raise ImageError(f"{self.label}: {path_text(where)}: overlapping extents at block {start}")
            if start >= nblocks:
                break
            if start > logical:
                yield (None, start - logical)
            used = min(length, nblocks - start)
            if phys + used > self.block_count or phys == 0:
                raise ImageError(f"{self.label}: {path_text(where)}: extent at block {phys} is outside the filesystem")
            yield (phys if init else None, used)
            logical = start + used
        if logical < nblocks:
            yield (None, nblocks - logical)

    def _extents(
        self, node: bytes, depth_expected: int | None, level: int, where: bytes, meta: list[int] | None = None
    ) -> Iterator[tuple[int, int, int, bool]]:
        magic, entries, max_entries, depth = struct.unpack_from("<HHHH", node, 0)
        capacity = (len(node) - 12) // 12
        if magic != EXTENT_MAGIC or entries > max_entries or max_entries > capacity:
            raise ImageError(f"{self.label}: {path_text(where)}: corrupt extent header")
        if depth > MAX_EXTENT_DEPTH or (depth_expected is not None and depth != depth_expected):
            raise ImageError(f"{self.label}: {path_text(where)}: corrupt extent tree depth {depth}")
        for i in range(entries):
            off = 12 + 12 * i
            if depth == 0:
                first, length, hi, lo = struct.unpack_from("<IHHI", node, off)
                init = length <= 32768
                if not init:
                    length -= 32768
                if length == 0:
                    raise ImageError(f"{self.label}: {path_text(where)}: empty extent")
                yield first, length, (hi << 32) | lo, init
            else:
                _first, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, off)
                child_block = (leaf_hi << 32) | leaf_lo
                if meta is not None:
                    meta.append(child_block)
                child = self._block(child_block, "extent tree block", where)
                yield from self._extents(child, depth - 1, level + 1, where, meta)

    def _indirect_runs(
        self, inode: Inode, nblocks: int, where: bytes, meta: list[int] | None
    ) -> Iterator[tuple[int | None, int]]:
        """ext2/3 block map: merged (first block or None for a hole, count) runs."""
        cur: int | None = None
        length = 0
        for phys, n in self._indirect_pieces(struct.unpack("<15I", inode.block), nblocks, where, meta):
            if length and (
                (phys is None and cur is None) or (phys is not None and cur is not None and phys == cur + length)
            ):
                length += n
                continue
            if length:
                yield (cur, length)
            cur, length = phys, n
        if length:
            yield (cur, length)

    def _indirect_pieces(
        self, ptrs: tuple[int, ...], nblocks: int, where: bytes, meta: list[int] | None = None
    ) -> Iterator[tuple[int | None, int]]:
        per = self.block_size // 4
        left = nblocks
        for p in ptrs[:12]:
            if left <= 0:
                return
            yield (self._data_block(p, where), 1)
            left -= 1
        for level, p in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if left <= 0:
                return
            take = min(per**level, left)
            yield from self._indirect_tree(p, level, take, per, where, meta=meta)
            left -= take

    def _indirect_tree(
        self, ptr: int, level: int, count: int, per: int, where: bytes, *, meta: list[int] | None = None
    ) -> Iterator[tuple[int | None, int]]:
        if ptr == 0:
            yield (None, count)  # a hole covers the whole subtree
            return
        if meta is not None:
            meta.append(ptr)
        table = struct.unpack(f"<{per}I", self._block(ptr, "indirect block", where))
        span = per ** (level - 1)
        left = count
        for p in table:
            if left <= 0:
                return
            take = min(span, left)
            if level == 1:
                yield (self._data_block(p, where), 1)
            else:
                yield from self._indirect_tree(p, level - 1, take, per, where, meta=meta)
            left -= take

    def _data_block(self, p: int, where: bytes) -> int | None:
        if p == 0:
            return None
        if p >= self.block_count:
            raise ImageError(f"{self.label}: {path_text(where)}: data block {p} is outside the filesystem")
        return p


def path_text(path: bytes) -> str:
    """A guest path for messages: manifest encoding, at most 200 characters."""

    text = encode_path(path or b"/")
    return text if len(text) <= 200 else text[:200] + "..."
