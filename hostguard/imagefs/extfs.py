"""A bounded, read-only ext2/3/4 reader for one volume of a disk image. Treats the image as hostile.

The superblock is parsed in `extsuper`, inodes, directories, inline data and xattrs here, extent trees and
block maps in `extmap`, following the kernel's rules, rather than with dissect.extfs: that (3.15) reads a
fixed 256-byte inode (wrong for 128-byte inodes, blind to xattrs past 256 bytes), drops inline data past
60 bytes, misplaces uninitialized extents after a hole, reads block 0 for a hole in a double-indirect
range, recurses into extent trees without a depth bound and seeks one shared file handle (not thread
safe). Every structure read here is bounds-checked; with metadata_csum, superblock and inode checksums
are verified as the kernel does. Corruption raises `ImageError` naming the volume and the offset or path.

A filesystem whose journal needs recovery (a running guest's, usually) is refused, or with
`replay_journal=True` read as the kernel would mount it: the committed transactions are replayed in memory
(`hostguard.imagefs.journal`), every read goes through that replayed view and nothing is written.

Thread safety: `content_runs`/`read_chunks` only read through `os.pread`, so several threads may stream file
content at once; the inode-table cache is locked.
"""

from __future__ import annotations

import bisect
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator

from hostguard.errors import ImageError
from hostguard.imagefs import HEAD_BYTES, FilesystemInfo, Limits, UnsupportedLayout
from hostguard.imagefs.crc32c import crc32c_raw
from hostguard.imagefs.disk import Segment, plan_segments, zero_chunks
from hostguard.imagefs.extmap import BlockMap, Inode, path_text
from hostguard.imagefs.extsuper import BigallocError, SuperblockError, parse_superblock
from hostguard.imagefs.journal import replay_map
from hostguard.imagefs.partitions import Volume
from hostguard.imagefs.pathwalk import NodeStat, TreeFs

_p = path_text

SB_OFFSET = 1024
ROOT_INO = 2
GOOD_OLD_INODE_SIZE = 128
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_CASEFOLD = 0x20000
SUPPORTED_INCOMPAT = (
    INCOMPAT_FILETYPE | INCOMPAT_META_BG | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_MMP | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR | INCOMPAT_INLINE_DATA | INCOMPAT_CASEFOLD
)  # fmt: skip
# The incompatible features this reader does not implement, as e2fsprogs names them.
INCOMPAT_NAMES = {0x1: "compression", INCOMPAT_JOURNAL_DEV: "journal_dev", 0x1000: "dirdata", 0x10000: "encrypt"}
COMPAT_SPARSE_SUPER2 = 0x200
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_METADATA_CSUM = 0x400
INLINE_DATA_FL = 0x10000000
EA_INODE_FL = 0x200000
ENCRYPT_FL = 0x800
XATTR_MAGIC = 0xEA020000
XATTR_INDEX_SECURITY = 6
XATTR_INDEX_SYSTEM = 7
INODE_CACHE_BLOCKS = 256
JBD2_MAGIC_BYTES = b"\xc0\x3b\x39\x98"


class ExtFilesystem(TreeFs[Inode]):
    """One ext2/3/4 filesystem. Construction validates the superblock and refuses what it cannot read."""

    def __init__(self, volume: Volume, limits: Limits, *, replay_journal: bool = False) -> None:
        self.volume = volume
        self.limits = limits
        self.label = volume.label
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        # Journal replay in memory (see `hostguard.imagefs.journal`): fs block -> (volume offset of the
        # journal's copy, escaped). Reads of a replayed block return the journal's copy.
        self.remap: dict[int, tuple[int, bool]] = {}
        self._remapped: list[int] = []
        self._load_superblock(volume.read(0, 2048))
        self.needed_recovery = bool(self.incompat & INCOMPAT_RECOVER)
        if self.needed_recovery:
            if not replay_journal:
                raise UnsupportedLayout(f"{self.label}: ext journal needs recovery (filesystem not cleanly unmounted)")
            remap = replay_map(self)
            if remap:
                self.remap = remap
                self._remapped = sorted(remap)
                with self._lock:
                    self._cache.clear()
                # The superblock itself may be in the journal: read the geometry again from the replayed view
                # (whose copy still says "needs recovery": that is what was journaled).
                self._load_superblock(self.read(0, 2048))

    def _load_superblock(self, head: bytes) -> None:
        volume = self.volume
        try:
            sb = parse_superblock(head[SB_OFFSET : SB_OFFSET + 1024])
        except BigallocError as err:
            raise UnsupportedLayout(f"{self.label}: ext feature not supported: {err}") from None
        except SuperblockError as err:
            raise ImageError(f"{self.label}: offset {SB_OFFSET}: bad ext superblock: {err}") from None
        self.sb = sb
        raw_sb = head[SB_OFFSET : SB_OFFSET + 1024]
        self.incompat = sb.s_feature_incompat
        self.ro_compat = sb.s_feature_ro_compat
        self.csum = bool(self.ro_compat & RO_COMPAT_METADATA_CSUM)
        if self.csum:
            want = struct.unpack_from("<I", raw_sb, 0x3FC)[0]
            if crc32c_raw(0xFFFFFFFF, raw_sb[:0x3FC]) != want:
                raise ImageError(f"{self.label}: offset {SB_OFFSET}: ext superblock checksum mismatch (corrupt)")
        unknown = self.incompat & ~(SUPPORTED_INCOMPAT | INCOMPAT_RECOVER)
        if unknown:
            names = [name for bit, name in INCOMPAT_NAMES.items() if unknown & bit]
            rest = unknown & ~sum(INCOMPAT_NAMES)
            names += [f"unknown {rest:#x}"] if rest else []
            raise UnsupportedLayout(f"{self.label}: ext feature not supported: {', '.join(names)}")
        self.block_size = 1024 << sb.s_log_block_size
        if sb.s_log_block_size > 6:
            raise ImageError(f"{self.label}: offset {SB_OFFSET + 24}: ext block size 2**{10 + sb.s_log_block_size}")
        self.block_count = sb.s_blocks_count_lo | (
            (sb.s_blocks_count_hi << 32) if self.incompat & INCOMPAT_64BIT else 0
        )
        if self.block_count * self.block_size > volume.size:
            raise ImageError(
                f"{self.label}: offset {SB_OFFSET + 4}: ext filesystem ({self.block_count} blocks of "
                f"{self.block_size}) is larger than its volume ({volume.size} bytes)"
            )
        self.inodes_count = sb.s_inodes_count
        self.inodes_per_group = sb.s_inodes_per_group
        self.inode_size = GOOD_OLD_INODE_SIZE if sb.s_rev_level == 0 else sb.s_inode_size
        if (
            self.inode_size < GOOD_OLD_INODE_SIZE
            or self.inode_size > self.block_size
            or self.inode_size & (self.inode_size - 1)
        ):
            raise ImageError(f"{self.label}: offset {SB_OFFSET + 88}: bad ext inode size {self.inode_size}")
        if self.incompat & INCOMPAT_64BIT:
            self.desc_size = sb.s_desc_size
            if self.desc_size < 64 or self.desc_size > 1024 or self.desc_size & (self.desc_size - 1):
                raise ImageError(f"{self.label}: offset {SB_OFFSET + 254}: bad group descriptor size {self.desc_size}")
        else:
            self.desc_size = 32
        if sb.s_blocks_per_group == 0 or self.inodes_per_group == 0:
            raise ImageError(f"{self.label}: offset {SB_OFFSET + 32}: ext blocks or inodes per group is zero")
        self.groups = -(-(self.block_count - sb.s_first_data_block) // sb.s_blocks_per_group)
        if self.inodes_per_group * self.groups < self.inodes_count:
            raise ImageError(f"{self.label}: offset {SB_OFFSET}: ext inode count exceeds the groups' inodes")
        if self.incompat & INCOMPAT_CSUM_SEED:
            self.csum_seed = sb.s_checksum_seed
        else:
            self.csum_seed = crc32c_raw(0xFFFFFFFF, bytes(sb.s_uuid))
        self.uuid = _uuid_text(bytes(sb.s_uuid))
        self.volume_label = bytes(sb.s_volume_name).split(b"\x00", 1)[0]
        self.blockmap = BlockMap(
            label=self.label,
            block_size=self.block_size,
            block_count=self.block_count,
            max_extents=self.limits.max_extents,
            read_block=self._block,
        )

    def info(self) -> FilesystemInfo:
        fstype = "ext4" if self.incompat & INCOMPAT_EXTENTS else "ext2/3"
        return self.volume.filesystem_info(fstype, self.uuid, self.volume_label)

    # --- blocks and inodes -----------------------------------------------------------------------------

    def _block(self, block: int, kind: str, where: bytes = b"") -> bytes:
        if not 0 < block < self.block_count:
            at = f"{_p(where)}: " if where else ""
            raise ImageError(f"{self.label}: {at}{kind} at block {block} is outside the filesystem")
        return self.read(block * self.block_size, self.block_size)

    # --- the replayed view -----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the volume as the filesystem sees them (journal replayed)."""
        if not self._remapped:
            return self.volume.read(offset, length)
        return b"".join(bytes(p) for p in self.pieces(offset, length))

    def _replayed_block(self, block: int) -> bytes:
        where, escaped = self.remap[block]
        data = self.volume.read(where, self.block_size)
        if escaped:
            data = JBD2_MAGIC_BYTES + data[4:]
        return data

    def pieces(self, offset: int, length: int) -> Iterator[bytes | memoryview]:
        """The volume bytes [offset, offset+length) in pieces (journal replayed). A piece may be this thread's
        reusable buffer: use it before asking for the next one."""
        bs = self.block_size
        pos, end = offset, offset + length
        if self._remapped:
            i = bisect.bisect_left(self._remapped, pos // bs)
            while pos < end:
                nxt = self._remapped[i] if i < len(self._remapped) else None
                if nxt is None or nxt * bs >= end:
                    yield from self._disk_pieces(pos, end - pos)
                    return
                if nxt * bs > pos:
                    yield from self._disk_pieces(pos, nxt * bs - pos)
                    pos = nxt * bs
                within = pos - nxt * bs
                take = min(bs - within, end - pos)
                yield self._replayed_block(nxt)[within : within + take]
                pos += take
                i += 1
            return
        yield from self._disk_pieces(offset, length)

    def _disk_pieces(self, offset: int, length: int) -> Iterator[bytes | memoryview]:
        return self.volume.image.read_segments(self.volume.segments(offset, length))

    def _cached_block(self, block: int, kind: str) -> bytes:
        with self._lock:
            data = self._cache.get(block)
            if data is not None:
                self._cache.move_to_end(block)
                return data
        data = self._block(block, kind)
        with self._lock:
            self._cache[block] = data
            while len(self._cache) > INODE_CACHE_BLOCKS:
                self._cache.popitem(last=False)
        return data

    def _desc_block(self, group: int) -> int:
        per_block = self.block_size // self.desc_size
        nr = group // per_block
        first = self.sb.s_first_data_block
        if self.incompat & INCOMPAT_META_BG and nr >= self.sb.s_first_meta_bg:
            bg = nr * per_block
            return int(first + bg * self.sb.s_blocks_per_group + (1 if self._has_super(bg) else 0))
        return int(first + 1 + nr)

    def _has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.sb.s_feature_compat & COMPAT_SPARSE_SUPER2:
            return group in tuple(self.sb.s_backup_bgs)
        if group <= 1 or not self.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def inode_table(self, group: int) -> int:
        """First block of a group's inode table (from its group descriptor)."""
        return self._inode_table(group)

    def _inode_table(self, group: int) -> int:
        per_block = self.block_size // self.desc_size
        data = self._cached_block(self._desc_block(group), "group descriptor block")
        off = (group % per_block) * self.desc_size
        table: int = struct.unpack_from("<I", data, off + 8)[0]
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", data, off + 0x28)[0] << 32
        return table

    def inode(self, ino: int, where: bytes = b"") -> Inode:
        if not 1 <= ino <= self.inodes_count:
            raise ImageError(f"{self.label}: {_p(where)}: inode number {ino} out of range")
        group, index = divmod(ino - 1, self.inodes_per_group)
        table = self._inode_table(group)
        byte = index * self.inode_size
        block = table + byte // self.block_size
        data = self._cached_block(block, "inode table")
        within = byte % self.block_size
        raw = data[within : within + self.inode_size]
        if self.csum:
            self._verify_inode(ino, raw, where)
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0)
        gid_lo, links, blocks_lo, flags = struct.unpack_from("<HHII", raw, 24)
        file_acl_lo, size_hi = struct.unpack_from("<II", raw, 104)
        blocks_hi, acl_hi, uid_hi, gid_hi = struct.unpack_from("<HHHH", raw, 116)
        size = size_lo
        if stat.S_ISREG(mode) or self.incompat & INCOMPAT_LARGEDIR:
            size |= size_hi << 32
        return Inode(
            ino=ino,
            mode=mode,
            uid=uid_lo | (uid_hi << 16),
            gid=gid_lo | (gid_hi << 16),
            size=size,
            links=links,
            blocks=blocks_lo | (blocks_hi << 32),
            flags=flags,
            block=raw[40:100],
            file_acl=file_acl_lo | (acl_hi << 32),
            raw=raw,
        )

    def _verify_inode(self, ino: int, raw: bytes, where: bytes) -> None:
        # crc32c(crc32c(crc32c(fs seed, inode number), generation), inode with its checksum fields zeroed)
        buf = bytearray(struct.pack("<I", ino) + raw[100:104] + raw)
        base = 8
        has_hi = False
        buf[base + 124 : base + 126] = b"\0\0"
        if self.inode_size > GOOD_OLD_INODE_SIZE:
            extra = struct.unpack_from("<H", raw, 128)[0]
            has_hi = GOOD_OLD_INODE_SIZE + extra >= 132
            if has_hi:
                buf[base + 130 : base + 132] = b"\0\0"
        csum = crc32c_raw(self.csum_seed, bytes(buf))
        want = struct.unpack_from("<H", raw, 124)[0]
        if has_hi:
            want |= struct.unpack_from("<H", raw, 130)[0] << 16
        else:
            csum &= 0xFFFF
        if csum != want:
            raise ImageError(f"{self.label}: {_p(where)}: inode {ino} checksum mismatch (corrupt)")

    # --- content ---------------------------------------------------------------------------------------

    def content_runs(self, inode: Inode, where: bytes) -> Iterator[tuple[int | None, int]]:
        """(byte offset in the volume or None for zeros, length) runs covering the inode's size."""
        return self.blockmap.content_runs(inode, where)

    def read_chunks(self, inode: Inode, where: bytes) -> Iterator[bytes | memoryview]:
        """Stream a file's content (inline data included). A piece may be a reusable per-thread buffer."""
        if inode.flags & INLINE_DATA_FL:
            data = self._inline_data(inode, where)
            yield data
            runs: Iterator[tuple[int | None, int]] = iter([(None, inode.size - len(data))])
        else:
            runs = self.content_runs(inode, where)
        for offset, length in runs:
            yield from (zero_chunks(length) if offset is None else self.pieces(offset, length))

    def content_segments(self, inode: Inode, where: bytes, limit: int) -> list[Segment] | None:
        """A file's content as segments of the disk image (`DiskImage.read_segments` reads them), so a
        hashing thread runs no per-chunk parser code. None when the content is not plain disk data (inline
        data, a replayed journal) or needs more than `limit` segments: then use `read_chunks`."""
        if inode.flags & INLINE_DATA_FL or self._remapped:
            return None
        return plan_segments(self.content_runs(inode, where), self.volume.segments, limit)

    def read_all(self, inode: Inode, where: bytes, limit: int) -> bytes:
        if inode.size > limit:
            raise ImageError(f"{self.label}: {_p(where)}: {inode.size} bytes exceed the limit of {limit}")
        return b"".join(bytes(c) for c in self.read_chunks(inode, where))

    def head(self, inode: Inode, where: bytes) -> bytes:
        if inode.size == 0:
            return b""
        want = min(HEAD_BYTES, inode.size)
        if inode.flags & INLINE_DATA_FL:
            return (self._inline_data(inode, where) + bytes(want))[:want]
        for offset, _length in self.content_runs(inode, where):
            if offset is None:
                return bytes(want)
            return self.read(offset, want)
        return b""

    def _inline_data(self, inode: Inode, where: bytes) -> bytes:
        """The inline part of an inline-data file: i_block, then the system.data xattr. Like the kernel,
        the file reads as this followed by zeros up to its size."""
        data = inode.block
        if inode.size > len(data):
            data += self.xattrs(inode, where).get((XATTR_INDEX_SYSTEM, b"data"), b"")
        return data[: inode.size]

    # --- xattrs ----------------------------------------------------------------------------------------

    def xattrs(self, inode: Inode, where: bytes) -> dict[tuple[int, bytes], bytes]:
        """The security.capability and system.data values of an inode, keyed (name index, name)."""
        wanted = {(XATTR_INDEX_SECURITY, b"capability"), (XATTR_INDEX_SYSTEM, b"data")}
        out: dict[tuple[int, bytes], bytes] = {}
        if self.inode_size > GOOD_OLD_INODE_SIZE:
            extra = struct.unpack_from("<H", inode.raw, 128)[0]
            start = GOOD_OLD_INODE_SIZE + extra
            if extra % 4 or start > self.inode_size:
                raise ImageError(f"{self.label}: {_p(where)}: bad i_extra_isize {extra}")
            if start + 4 <= self.inode_size and struct.unpack_from("<I", inode.raw, start)[0] == XATTR_MAGIC:
                body = inode.raw[start + 4 :]
                self._xattr_entries(body, 0, body, wanted=wanted, out=out, where=where)
        if inode.file_acl:
            block = self._block(inode.file_acl, "xattr block", where)
            magic, _refcount, nblocks = struct.unpack_from("<III", block, 0)
            if magic != XATTR_MAGIC or nblocks != 1:
                raise ImageError(f"{self.label}: {_p(where)}: corrupt xattr block {inode.file_acl}")
            self._xattr_entries(block, 32, block, wanted=wanted, out=out, where=where)
        return out

    def _xattr_entries(
        self,
        area: bytes,
        pos: int,
        values: bytes,
        *,
        wanted: set[tuple[int, bytes]],
        out: dict[tuple[int, bytes], bytes],
        where: bytes,
    ) -> None:
        while pos + 4 <= len(area) and struct.unpack_from("<I", area, pos)[0] != 0:
            if pos + 16 > len(area):
                raise ImageError(f"{self.label}: {_p(where)}: xattr entry crosses its area")
            name_len, index, value_offs, value_inum, value_size = struct.unpack_from("<BBHII", area, pos)
            name = area[pos + 16 : pos + 16 + name_len]
            if len(name) != name_len:
                raise ImageError(f"{self.label}: {_p(where)}: xattr name crosses its area")
            pos += (16 + name_len + 3) & ~3
            key = (index, bytes(name))
            if key not in wanted or key in out:
                continue
            if value_size > self.limits.max_xattr_bytes:
                raise ImageError(f"{self.label}: {_p(where)}: xattr value of {value_size} bytes exceeds the limit")
            if value_inum:
                if not self.incompat & INCOMPAT_EA_INODE:
                    raise ImageError(f"{self.label}: {_p(where)}: xattr in an inode without the ea_inode feature")
                ea = self.inode(value_inum, where)
                if not ea.flags & EA_INODE_FL or ea.size < value_size:
                    raise ImageError(f"{self.label}: {_p(where)}: corrupt xattr inode {value_inum}")
                out[key] = self.read_all(ea, where, self.limits.max_xattr_bytes)[:value_size]
            else:
                value = values[value_offs : value_offs + value_size]
                if len(value) != value_size:
                    raise ImageError(f"{self.label}: {_p(where)}: xattr value crosses its area")
                out[key] = bytes(value)

    # --- directories -----------------------------------------------------------------------------------

    def dir_entries(self, inode: Inode, where: bytes) -> Iterator[tuple[bytes, int]]:
        """(name, inode number) of each entry of a directory, except . and .."""
        if inode.size > self.limits.max_dir_bytes:
            raise ImageError(f"{self.label}: {_p(where)}: directory of {inode.size} bytes exceeds the limit")
        if inode.flags & INLINE_DATA_FL:
            yield from self._parse_dirents(inode.block[4:60], 56, where)
            extra = self.xattrs(inode, where).get((XATTR_INDEX_SYSTEM, b"data"), b"")
            if extra:
                yield from self._parse_dirents(extra, len(extra), where)
            return
        buf = bytearray()
        for chunk in self.read_chunks(inode, where):
            buf += chunk
            whole = len(buf) - len(buf) % self.block_size
            if whole:
                yield from self._parse_dirents(bytes(buf[:whole]), self.block_size, where)
                del buf[:whole]
        if buf:
            raise ImageError(f"{self.label}: {_p(where)}: directory size is not a multiple of the block size")

    def _parse_dirents(self, data: bytes, unit: int, where: bytes) -> Iterator[tuple[bytes, int]]:
        filetype = self.incompat & INCOMPAT_FILETYPE
        for base in range(0, len(data), unit):
            end = min(base + unit, len(data))
            pos = base
            while pos + 8 <= end:
                ino, rec_len, name_len = struct.unpack_from("<IHH", data, pos)
                if unit >= 65536 and rec_len in (0, 65535):
                    rec_len = unit
                elif unit >= 65536:
                    rec_len = (rec_len & 65532) | ((rec_len & 3) << 16)
                if filetype:
                    name_len &= 0xFF
                if rec_len < 8 or rec_len % 4 or pos + rec_len > end or 8 + name_len > rec_len:
                    raise ImageError(
                        f"{self.label}: {_p(where)}: corrupt directory entry at byte {pos} of the directory"
                    )
                if ino:
                    name = data[pos + 8 : pos + 8 + name_len]
                    if name not in (b".", b".."):
                        if not name or b"/" in name or b"\x00" in name:
                            raise ImageError(f"{self.label}: {_p(where)}: directory entry with an invalid name")
                        yield bytes(name), ino
                pos += rec_len

    # --- walking ---------------------------------------------------------------------------------------

    def root_node(self) -> Inode:
        return self.inode(ROOT_INO, b"/")

    def mode_of(self, node: Inode) -> int:
        return node.mode

    def ino_of(self, node: Inode) -> int:
        return node.ino

    def walk_entries(self, node: Inode, where: bytes) -> Iterator[tuple[bytes, int]]:
        return self.dir_entries(node, where)  # taken as parsed

    @property
    def locator(self) -> str:
        return self.volume.locator

    def node_stat(self, node: Inode, path: bytes) -> NodeStat:
        if node.flags & ENCRYPT_FL and stat.S_IFMT(node.mode) in (stat.S_IFDIR, stat.S_IFREG):
            what = "directory" if stat.S_ISDIR(node.mode) else "file"
            raise UnsupportedLayout(f"{self.label}: {_p(path)}: encrypted {what}")
        return NodeStat(node.mode, node.ino, node.uid, node.gid, node.size, node.links)

    def capability(self, node: Inode, where: bytes) -> bytes | None:
        return self.xattrs(node, where).get((XATTR_INDEX_SECURITY, b"capability"))

    def symlink_target(self, inode: Inode, where: bytes) -> bytes:
        if inode.size > self.limits.max_path_bytes:
            raise ImageError(f"{self.label}: {_p(where)}: symlink target too long")
        ea_blocks = (self.block_size >> 9) if inode.file_acl else 0
        if not inode.flags & INLINE_DATA_FL and inode.blocks - ea_blocks == 0:
            return inode.block[: inode.size]
        return self.read_all(inode, where, self.limits.max_path_bytes)


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
