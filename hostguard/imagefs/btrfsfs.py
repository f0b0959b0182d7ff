"""Btrfs for the fast reader: one `BtrfsSubvolume` per subvolume, placed through the guest's fstab (ADR 0022).

dissect.btrfs parses the superblock (`c_btrfs.btrfs_super_block`) and the chunk items; its B-tree cursor and
extent stream are not used, because they trust what they read (a node that points at itself loops forever, a
compressed extent inflates without bound). Here, as the kernel's tree-checker does, every tree node is checked
before use: checksum, its own address, filesystem id, the level its parent expects, item bounds and key
order; each node is read at most once per walk (no cycles). Compressed extents (zlib, LZO, zstd) are inflated
to at most their `ram_bytes`, itself at most 128 KiB as the kernel writes them; inline extents are read from
the tree; uncompressed extents are read with `os.pread` through the volume's segments.

Each subvolume is a filesystem of its own for the reader (locator `diskNpM` for the top level, id 5, and
`diskNpM:subvolid=N` for the others), so `imagefs.layout` places it where the guest's fstab mounts it
(`subvol=`/`subvolid=`, else the default subvolume) or nested in a placed parent. A subvolume's walk stops at
nested subvolumes: those are walked as their own filesystems.

Refused with `UnsupportedLayout`, naming the feature: a filesystem on several devices, RAID block groups,
checksums other than crc32c, an fsync log that needs replay (a running guest's state the kernel would
replay on mount), encrypted or otherwise encoded extents, incompat features not listed in `KNOWN_INCOMPAT`.
Malformed structures are `ImageError`s.
"""

from __future__ import annotations

import bisect
import stat
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import Any

from hostguard.errors import ImageError
from hostguard.imagefs import HEAD_BYTES, FilesystemInfo, Limits, UnsupportedLayout
from hostguard.imagefs.crc32c import crc32c_raw
from hostguard.imagefs.disk import Segment, plan_segments, zero_chunks
from hostguard.imagefs.extmap import path_text
from hostguard.imagefs.partitions import Volume
from hostguard.imagefs.pathwalk import NodeStat, TreeFs
from hostguard.record import Record, replace

SUPER_OFFSET = 0x10000
MAGIC = 0x4D5F53665248425F  # "_BHRfS_M"
HEADER = 101
ITEM = 25  # leaf item: key (17) + data offset + size
KEY_PTR = 33  # internal node entry: key + block pointer + generation
MAX_LEVEL = 8
FS_TREE, ROOT_TREE_DIR, FIRST_FREE = 5, 6, 256
LAST_FREE = (1 << 64) - 256
INODE_ITEM, INODE_REF, XATTR_ITEM, DIR_ITEM, DIR_INDEX, EXTENT_DATA = 1, 12, 24, 84, 96, 108
ROOT_ITEM, ROOT_BACKREF, CHUNK_ITEM = 132, 144, 228
EXTENT_INLINE, EXTENT_REG, EXTENT_PREALLOC = 0, 1, 2
COMPRESS_NONE, COMPRESS_ZLIB, COMPRESS_LZO, COMPRESS_ZSTD = 0, 1, 2, 3
MAX_COMPRESSED = 128 << 10  # BTRFS_MAX_COMPRESSED / BTRFS_MAX_UNCOMPRESSED
# Incompat features this reader handles: mixed backrefs, default subvolume, mixed block groups, LZO, zstd,
# big metadata, extended inode refs, skinny metadata, no holes, metadata UUID, block group tree (ro compat).
INCOMPAT_NAMES = {
    1 << 7: "raid56",
    1 << 11: "raid1c34",
    1 << 12: "zoned",
    1 << 13: "extent_tree_v2",
    1 << 14: "raid_stripe_tree",
    1 << 16: "simple_quota",
}
KNOWN_INCOMPAT = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 9)
INCOMPAT_METADATA_UUID = 1 << 10
KNOWN_INCOMPAT |= INCOMPAT_METADATA_UUID | (1 << 16)  # simple quotas change accounting only, not file data
GROUP_PROFILES = {8: "RAID0", 16: "RAID1", 64: "RAID10", 128: "RAID5", 256: "RAID6", 512: "RAID1C3", 1024: "RAID1C4"}
GROUP_DUP = 32
CSUM_NAMES = {1: "xxhash64", 2: "sha256", 3: "blake2b"}
CAPABILITY = b"security.capability"
MAX_SUBVOLUMES = 4096
MAX_NESTING = 256  # subvolumes inside subvolumes (kept well under Python's recursion limit)

_p = path_text
_KEY = struct.Struct("<QBQ")
_LEAF_ITEM = struct.Struct("<QBQII")
_KEY_PTR = struct.Struct("<QBQQ")
_INODE = struct.Struct("<16xQ8x8xIIIIQQ")  # size, nlink, uid, gid, mode, rdev, flags
_DIR = struct.Struct("<QBQ8xHHB")  # location key, data_len, name_len, type
_EXTENT_HEAD = struct.Struct("<8xQBBHB")  # ram_bytes, compression, encryption, other_encoding, type
_EXTENT_REG = struct.Struct("<QQQQ")  # disk_bytenr, disk_num_bytes, offset, num_bytes


class Inode(Record, frozen=False):
    """What the walk keeps of one inode: its item fields, directory entries, capability and extents."""

    ino: int
    size: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    mode: int = 0
    seen: bool = False
    entries: list[tuple[bytes, int, int]] | None = None  # (name, location objectid, location type)
    capability: bytes | None = None
    extents: list[tuple[int, bytes]] | None = None  # (file offset, raw extent item)


class Chunk(Record):
    logical: int
    length: int
    physical: int  # byte offset of stripe 0 in the volume


class BtrfsFilesystem:
    """One single-device Btrfs filesystem: superblock, chunk map and tree access. Subvolumes on top."""

    def __init__(self, volume: Volume, limits: Limits) -> None:
        from dissect.btrfs.c_btrfs import c_btrfs

        self.volume = volume
        self.limits = limits
        self.label = volume.label
        if volume.size < SUPER_OFFSET + 4096:
            raise ImageError(f"{self.label}: volume too small for a Btrfs superblock")
        raw = volume.read(SUPER_OFFSET, 4096)
        sb = c_btrfs.btrfs_super_block(raw)
        if sb.magic != MAGIC:
            raise ImageError(f"{self.label}: no Btrfs superblock")
        if sb.csum_type != 0:
            name = CSUM_NAMES.get(sb.csum_type, f"type {sb.csum_type}")
            raise UnsupportedLayout(f"{self.label}: Btrfs with {name} checksums")
        if crc32c_raw(0xFFFFFFFF, raw[32:]) ^ 0xFFFFFFFF != struct.unpack_from("<I", raw, 0)[0]:
            raise self._corrupt("superblock checksum mismatch")
        unknown = sb.incompat_flags & ~KNOWN_INCOMPAT
        if unknown:
            names = [INCOMPAT_NAMES.get(1 << b, f"bit {b}") for b in range(64) if unknown >> b & 1]
            raise UnsupportedLayout(f"{self.label}: Btrfs incompat feature {', '.join(names)}")
        if sb.num_devices != 1:
            raise UnsupportedLayout(f"{self.label}: Btrfs on {sb.num_devices} devices")
        if sb.log_root:
            raise UnsupportedLayout(f"{self.label}: Btrfs log tree (fsync log) present: needs replay on mount")
        ss, ns = sb.sectorsize, sb.nodesize
        if ss < 4096 or ss > 65536 or ss & (ss - 1) or ns < ss or ns > 65536 or ns & (ns - 1):
            raise self._corrupt(f"invalid sector size {ss} or node size {ns}")
        self.sector_size, self.node_size = ss, ns
        self.devid = sb.dev_item.devid
        fsid = bytes(sb.metadata_uuid if sb.incompat_flags & INCOMPAT_METADATA_UUID else sb.fsid)
        self.meta_fsid = fsid
        u = bytes(sb.fsid).hex()
        self.uuid = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
        self.volume_label = bytes(sb.label).split(b"\x00")[0]
        self._chunks: list[Chunk] = []
        self._starts: list[int] = []
        self._nodes_read = 0
        self._sys_chunks(bytes(sb.sys_chunk_array)[: sb.sys_chunk_array_size])
        for _key, data in self.items(sb.chunk_root, sb.chunk_root_level, "chunk tree"):
            if _key[1] == CHUNK_ITEM:
                self._add_chunk(_key[2], bytes(data))
        self.root_tree = (sb.root, sb.root_level)
        self.default_subvolume = self._default_subvolume()

    def _corrupt(self, what: str) -> ImageError:
        return ImageError(f"{self.label}: corrupt Btrfs filesystem: {what}")

    # --- chunks: logical -> volume offsets -------------------------------------------------------------

    def _sys_chunks(self, array: bytes) -> None:
        pos = 0
        while pos < len(array):
            if pos + 17 + 48 > len(array):
                raise self._corrupt("system chunk array")
            _obj, kind, logical = _KEY.unpack_from(array, pos)
            num = struct.unpack_from("<H", array, pos + 17 + 44)[0]
            end = pos + 17 + 48 + 32 * num
            if kind != CHUNK_ITEM or num == 0 or end > len(array):
                raise self._corrupt("system chunk array")
            self._add_chunk(logical, array[pos + 17 : end])
            pos = end

    def _add_chunk(self, logical: int, item: bytes) -> None:
        if len(item) < 48 + 32:
            raise self._corrupt(f"chunk item at {logical}")
        length, _owner, _stripe_len, kind = struct.unpack_from("<QQQQ", item, 0)
        num = struct.unpack_from("<H", item, 44)[0]
        if num == 0 or len(item) < 48 + 32 * num or length == 0:
            raise self._corrupt(f"chunk item at {logical}")
        for bit, name in GROUP_PROFILES.items():
            if kind & bit:
                raise UnsupportedLayout(f"{self.label}: Btrfs {name} block groups")
        if num != (2 if kind & GROUP_DUP else 1):
            raise self._corrupt(f"chunk item at {logical}: {num} stripes")
        devid, physical = struct.unpack_from("<QQ", item, 48)
        if devid != self.devid:
            raise UnsupportedLayout(f"{self.label}: Btrfs chunk on another device ({devid})")
        if physical + length > self.volume.size or physical + length < physical:
            raise self._corrupt(f"chunk at {logical} outside the volume")
        i = bisect.bisect_right(self._starts, logical)
        before = self._chunks[i - 1] if i else None
        if before is not None and before.logical == logical and before.length == length:
            return  # the system chunks are also in the chunk tree
        after = self._chunks[i] if i < len(self._chunks) else None
        if (before is not None and before.logical + before.length > logical) or (
            after is not None and logical + length > after.logical
        ):
            raise self._corrupt(f"overlapping chunks at {logical}")
        if len(self._chunks) >= 1 << 16:
            raise self._corrupt("chunk tree: too many chunks")
        self._chunks.append(Chunk(logical, length, physical))
        self._chunks.sort(key=lambda c: c.logical)
        self._starts = [c.logical for c in self._chunks]

    def map(self, logical: int, length: int) -> Iterator[tuple[int, int]]:
        """(volume offset, length) runs of the logical range [logical, logical+length)."""
        while length > 0:
            i = bisect.bisect_right(self._starts, logical) - 1
            chunk = self._chunks[i] if i >= 0 else None
            if chunk is None or logical >= chunk.logical + chunk.length:
                raise self._corrupt(f"logical address {logical} outside every chunk")
            n = min(length, chunk.logical + chunk.length - logical)
            yield chunk.physical + logical - chunk.logical, n
            logical += n
            length -= n

    def read_logical(self, logical: int, length: int) -> bytes:
        return b"".join(self.volume.read(off, n) for off, n in self.map(logical, length))

    # --- trees -----------------------------------------------------------------------------------------

    def node(self, address: int, level: int, what: str) -> bytes:
        """The tree node at `address`, checked as the kernel's tree-checker does, at the `level` expected."""
        self._nodes_read += 1
        data = self.read_logical(address, self.node_size)
        if crc32c_raw(0xFFFFFFFF, data[32:]) ^ 0xFFFFFFFF != struct.unpack_from("<I", data, 0)[0]:
            raise self._corrupt(f"{what}: node at {address}: checksum mismatch")
        bytenr = struct.unpack_from("<Q", data, 48)[0]
        nritems, node_level = struct.unpack_from("<IB", data, 96)
        if bytenr != address or data[32:48] != self.meta_fsid:
            raise self._corrupt(f"{what}: node at {address}: written for another address or filesystem")
        if node_level != level:
            raise self._corrupt(f"{what}: node at {address}: level {node_level}, expected {level}")
        size = KEY_PTR if level else ITEM
        if HEADER + nritems * size > self.node_size or (level and nritems == 0):
            raise self._corrupt(f"{what}: node at {address}: {nritems} items do not fit")
        return data

    def items(self, root: int, level: int, what: str) -> Iterator[tuple[tuple[int, int, int], memoryview]]:
        """Every leaf item of the tree at `root`, in key order, each node read once; items checked against
        their leaf (data inside it, keys ascending)."""
        if level >= MAX_LEVEL:
            raise self._corrupt(f"{what}: root level {level}")
        seen: set[int] = set()
        stack: list[tuple[int, int]] = [(root, level)]
        last: tuple[int, int, int] | None = None
        while stack:
            address, lvl = stack.pop()
            if address in seen:
                raise self._corrupt(f"{what}: node at {address} reached twice")
            seen.add(address)
            if len(seen) > self.limits.max_nodes:
                raise ImageError(f"{self.label}: {what}: more than {self.limits.max_nodes} tree nodes")
            data = self.node(address, lvl, what)
            nritems = struct.unpack_from("<I", data, 96)[0]
            if lvl:
                children = [_KEY_PTR.unpack_from(data, HEADER + i * KEY_PTR)[3] for i in range(nritems)]
                stack.extend((child, lvl - 1) for child in reversed(children))
                continue
            view = memoryview(data)
            for i in range(nritems):
                obj, kind, off, doff, dsize = _LEAF_ITEM.unpack_from(data, HEADER + i * ITEM)
                key = (obj, kind, off)
                if last is not None and key <= last:
                    raise self._corrupt(f"{what}: keys out of order in the node at {address}")
                last = key
                if HEADER + doff + dsize > self.node_size or doff < nritems * ITEM:
                    raise self._corrupt(f"{what}: item data outside the node at {address}")
                yield key, view[HEADER + doff : HEADER + doff + dsize]

    def find(self, root: tuple[int, int], key: tuple[int, int, int], what: str) -> memoryview | None:
        """The item with exactly `key` in a tree, by descent (checked nodes, levels strictly decreasing)."""
        address, level = root
        if level >= MAX_LEVEL:
            raise self._corrupt(f"{what}: root level {level}")
        while True:
            data = self.node(address, level, what)
            nritems = struct.unpack_from("<I", data, 96)[0]
            if level == 0:
                for i in range(nritems):
                    obj, kind, off, doff, dsize = _LEAF_ITEM.unpack_from(data, HEADER + i * ITEM)
                    if (obj, kind, off) == key:
                        if HEADER + doff + dsize > self.node_size:
                            raise self._corrupt(f"{what}: item data outside the node at {address}")
                        return memoryview(data)[HEADER + doff : HEADER + doff + dsize]
                return None
            child = None
            for i in range(nritems):
                obj, kind, off, ptr = _KEY_PTR.unpack_from(data, HEADER + i * KEY_PTR)
                if (obj, kind, off) > key:
                    break
                child = ptr
            if child is None:
                return None
            address, level = child, level - 1

    # --- subvolumes ------------------------------------------------------------------------------------

    def _default_subvolume(self) -> int:
        name = b"default"
        item = self.find(self.root_tree, (ROOT_TREE_DIR, DIR_ITEM, name_hash(name)), "root tree")
        if item is None:
            return FS_TREE
        for obj, _kind, _name in dir_items(item, self.label):
            if _name == name:
                return obj
        return FS_TREE

    def subvolumes(self) -> list[tuple[int, str, tuple[int, int], int]]:
        """(id, path from the top level, (tree root, level), root directory inode) of every live subvolume."""
        roots: dict[int, tuple[tuple[int, int], int]] = {}
        backrefs: dict[int, tuple[int, int, bytes]] = {}
        for (obj, kind, off), data in self.items(*self.root_tree, "root tree"):
            is_subvol = obj == FS_TREE or FIRST_FREE <= obj <= LAST_FREE
            if kind == ROOT_ITEM and is_subvol:
                if len(data) < 239:
                    raise self._corrupt(f"root tree: root item of subvolume {obj}")
                dirid, bytenr = struct.unpack_from("<QQ", data, 168)
                refs = struct.unpack_from("<I", data, 216)[0]
                if refs or obj == FS_TREE:
                    roots[obj] = ((bytenr, data[238]), dirid)
            elif kind == ROOT_BACKREF and is_subvol:
                if len(data) < 18 or 18 + struct.unpack_from("<H", data, 16)[0] > len(data):
                    raise self._corrupt(f"root tree: back reference of subvolume {obj}")
                dirid, _seq, n = struct.unpack_from("<QQH", data, 0)
                backrefs.setdefault(obj, (off, dirid, bytes(data[18 : 18 + n])))
            if len(roots) > MAX_SUBVOLUMES:
                raise ImageError(f"{self.label}: more than {MAX_SUBVOLUMES} Btrfs subvolumes")
        if FS_TREE not in roots:
            raise self._corrupt("root tree: no top-level subvolume")
        paths: dict[int, str] = {FS_TREE: ""}

        def path_of(sid: int, depth: int = 0) -> str | None:
            if sid in paths:
                return paths[sid]
            ref = backrefs.get(sid)
            if ref is None or ref[0] not in roots:
                return None  # deleted (no reference left) or orphaned: the guest cannot see it
            if depth > MAX_NESTING:
                raise self._corrupt(f"root tree: subvolume {sid} nested more than {MAX_NESTING} deep (a loop?)")
            parent = path_of(ref[0], depth + 1)
            if parent is None:
                return None
            inside = self._dir_path(roots[ref[0]][0], ref[1], roots[ref[0]][1])
            name = ref[2].decode("utf-8", "surrogateescape")
            full = "/".join(p for p in (parent, inside, name) if p)
            paths[sid] = full
            return full

        out = []
        for sid in sorted(roots):
            path = path_of(sid)
            if path is not None:
                out.append((sid, path, roots[sid][0], roots[sid][1]))
        return out

    def _dir_path(self, tree: tuple[int, int], dirid: int, root_dirid: int) -> str:
        """Path of directory `dirid` inside a subvolume, from its INODE_REF chain (bounded)."""
        names: list[str] = []
        for _ in range(self.limits.max_path_bytes):
            if dirid == root_dirid:
                return "/".join(reversed(names))
            ref = self._inode_ref(tree, dirid)
            if ref is None:
                raise self._corrupt(f"subvolume tree: directory {dirid} without a reference")
            dirid, name = ref
            names.append(name.decode("utf-8", "surrogateescape"))
        raise self._corrupt("subvolume tree: directory references loop")

    def _inode_ref(self, tree: tuple[int, int], ino: int) -> tuple[int, bytes] | None:
        # An INODE_REF key's offset is the parent directory: the first one in key order is found by descent.
        address, level = tree
        while True:
            data = self.node(address, level, "subvolume tree")
            nritems = struct.unpack_from("<I", data, 96)[0]
            if level == 0:
                for i in range(nritems):
                    obj, kind, off, doff, dsize = _LEAF_ITEM.unpack_from(data, HEADER + i * ITEM)
                    if obj == ino and kind == INODE_REF and dsize >= 10 and HEADER + doff + dsize <= self.node_size:
                        n = struct.unpack_from("<H", data, HEADER + doff + 8)[0]
                        return off, data[HEADER + doff + 10 : HEADER + doff + 10 + n]
                return None
            child = None
            for i in range(nritems):
                obj, kind, off, ptr = _KEY_PTR.unpack_from(data, HEADER + i * KEY_PTR)
                if (obj, kind, off) > (ino, INODE_REF, 0) and child is not None:
                    break
                child = ptr
            if child is None:
                return None
            address, level = child, level - 1


def name_hash(name: bytes) -> int:
    """btrfs_name_hash: crc32c seeded with ~1, no final inversion."""
    return crc32c_raw(0xFFFFFFFE, name)


def dir_items(data: memoryview | bytes, label: str) -> Iterator[tuple[int, int, bytes]]:
    """(location objectid, location type, name) of each btrfs_dir_item packed in one DIR_ITEM item."""
    pos = 0
    while pos < len(data):
        if pos + 30 > len(data):
            raise ImageError(f"{label}: Btrfs directory item truncated")
        obj, kind, _off, data_len, name_len, _ftype = _DIR.unpack_from(data, pos)
        end = pos + 30 + name_len + data_len
        if end > len(data):
            raise ImageError(f"{label}: Btrfs directory item beyond its data")
        yield obj, kind, bytes(data[pos + 30 : pos + 30 + name_len])
        pos = end


class BtrfsSubvolume(TreeFs[Inode]):
    """One subvolume of a `BtrfsFilesystem`: the fast reader's view of one filesystem."""

    def __init__(self, fs: BtrfsFilesystem, sid: int, path: str, tree: tuple[int, int], root_dirid: int) -> None:
        self.fs = fs
        self.volume = fs.volume
        self.limits = fs.limits
        self.sid = sid
        self.path = path
        self.tree = tree
        self.root_dirid = root_dirid
        self.label = fs.label if sid == FS_TREE else f"{fs.label} (Btrfs subvolume {path or sid})"
        self._inodes: dict[int, Inode] | None = None

    @property
    def locator(self) -> str:
        base = self.volume.locator
        return base if self.sid == FS_TREE else f"{base}:subvolid={self.sid}"

    def info(self) -> FilesystemInfo:
        return replace(
            self.volume.filesystem_info("btrfs", self.fs.uuid, self.fs.volume_label),
            locator=self.locator,
            device=self.label,
            subvolume=self.path,
            subvolid=self.sid,
            default_subvolume=self.sid == self.fs.default_subvolume,
        )

    # --- the one pass over the subvolume's tree --------------------------------------------------------

    def inodes(self) -> dict[int, Inode]:
        """Every inode's item, directory entries, capability and extents, from one pass over the tree."""
        if self._inodes is not None:
            return self._inodes
        out: dict[int, Inode] = {}
        label = self.label
        entries = 0
        current: Inode | None = None
        for (obj, kind, off), data in self.fs.items(*self.tree, "subvolume tree"):
            if kind not in (INODE_ITEM, XATTR_ITEM, DIR_INDEX, EXTENT_DATA):
                continue
            if current is None or current.ino != obj:
                current = out.get(obj)
                if current is None:
                    current = out[obj] = Inode(obj)
            if kind == INODE_ITEM:
                if len(data) < 160:
                    raise ImageError(f"{label}: inode {obj}: truncated inode item")
                size, nlink, uid, gid, mode, _rdev, _flags = _INODE.unpack_from(data, 0)
                current.size, current.nlink, current.uid, current.gid, current.mode = size, nlink, uid, gid, mode
                current.seen = True
            elif kind == DIR_INDEX:
                entries += 1
                if entries > self.limits.max_nodes:
                    raise ImageError(f"{label}: more than {self.limits.max_nodes} directory entries")
                found = list(dir_items(data, label))
                if len(found) != 1:
                    raise ImageError(f"{label}: directory {obj}: index item with {len(found)} entries")
                if current.entries is None:
                    current.entries = []
                loc, loc_kind, name = found[0]
                current.entries.append((name, loc, loc_kind))
            elif kind == XATTR_ITEM:
                for _o, _k, name in dir_items(data, label):
                    if name == CAPABILITY:
                        current.capability = _xattr_value(data, CAPABILITY, label)
            else:
                if current.extents is None:
                    current.extents = []
                if len(current.extents) >= self.limits.max_extents:
                    raise ImageError(f"{label}: inode {obj}: more than {self.limits.max_extents} extents")
                current.extents.append((off, bytes(data)))
        self._inodes = out
        return out

    def inode(self, ino: int, where: bytes) -> Inode:
        node = self.inodes().get(ino)
        if node is None or not node.seen:
            raise ImageError(f"{self.label}: {_p(where)}: inode {ino} has no inode item")
        return node

    # --- content ---------------------------------------------------------------------------------------

    def pieces(self, node: Inode, where: bytes) -> Iterator[tuple[int | None, int] | bytes]:
        """The file's content as (volume offset or None for zeros, length) runs and literal byte strings
        (inline and compressed extents), covering exactly its size."""
        size = node.size
        if size > self.limits.max_file_bytes:
            raise ImageError(f"{self.label}: {_p(where)}: size {size} exceeds the limit")
        pos = 0
        for offset, raw in node.extents or ():
            if offset >= size:
                break
            if offset < pos:
                raise ImageError(f"{self.label}: {_p(where)}: overlapping extents at {offset}")
            if offset > pos:
                yield None, offset - pos
                pos = offset
            for piece in self._extent(raw, where):
                n = piece[1] if isinstance(piece, tuple) else len(piece)
                n = min(n, size - pos)
                if n <= 0:
                    break
                yield (piece[0], n) if isinstance(piece, tuple) else piece[:n]
                pos += n
        if pos < size:
            yield None, size - pos

    def _extent(self, raw: bytes, where: bytes) -> Iterator[tuple[int | None, int] | bytes]:
        label = self.label
        if len(raw) < 21:
            raise ImageError(f"{label}: {_p(where)}: truncated extent item")
        ram_bytes, compression, encryption, other, kind = _EXTENT_HEAD.unpack_from(raw, 0)
        if encryption or other:
            raise UnsupportedLayout(f"{label}: {_p(where)}: Btrfs encrypted or encoded extent")
        if kind == EXTENT_INLINE:
            if ram_bytes > self.fs.sector_size:
                raise ImageError(f"{label}: {_p(where)}: inline extent of {ram_bytes} bytes")
            yield self._inflate(raw[21:], compression, ram_bytes, where)
            return
        if kind not in (EXTENT_REG, EXTENT_PREALLOC) or len(raw) < 53:
            raise ImageError(f"{label}: {_p(where)}: extent of type {kind}")
        disk, disk_len, offset, num = _EXTENT_REG.unpack_from(raw, 21)
        if num == 0:
            raise ImageError(f"{label}: {_p(where)}: extent of {num} bytes")
        if kind == EXTENT_PREALLOC or disk == 0:
            yield None, num  # preallocated: reads as zeros, as the kernel reads it; 0: a hole
            return
        if compression == COMPRESS_NONE:
            if offset + num > disk_len:
                raise ImageError(f"{label}: {_p(where)}: extent reference beyond its extent")
            yield from self.fs.map(disk + offset, num)
            return
        if disk_len > MAX_COMPRESSED or ram_bytes > MAX_COMPRESSED or offset + num > ram_bytes:
            raise ImageError(f"{label}: {_p(where)}: compressed extent of {disk_len}/{ram_bytes} bytes")
        data = self._inflate(self.fs.read_logical(disk, disk_len), compression, ram_bytes, where)
        yield data[offset : offset + num]

    def _inflate(self, data: bytes, compression: int, ram_bytes: int, where: bytes) -> bytes:
        """`data` decompressed to at most `ram_bytes` (zero-filled to it, as the kernel reads a short one)."""
        label = self.label
        try:
            if compression == COMPRESS_NONE:
                out = bytes(data[:ram_bytes])
            elif compression == COMPRESS_ZLIB:
                out = zlib.decompressobj().decompress(data, ram_bytes)
            elif compression == COMPRESS_ZSTD:
                out = _zstd().ZstdDecompressor().decompress(data, max_length=ram_bytes)
            elif compression == COMPRESS_LZO:
                out = _lzo(data, ram_bytes, self.fs.sector_size)
            else:
                raise ImageError(f"{label}: {_p(where)}: unknown compression {compression}")
        except ImageError:
            raise
        except Exception as err:  # noqa: BLE001 - a decompressor on hostile data: any failure is corruption
            raise ImageError(f"{label}: {_p(where)}: compressed extent: {type(err).__name__}: {err}") from None
        return out + bytes(ram_bytes - len(out)) if len(out) < ram_bytes else out[:ram_bytes]

    def read_chunks(self, node: Inode, where: bytes) -> Iterator[bytes | memoryview]:
        image = self.volume.image
        for piece in self.pieces(node, where):
            if isinstance(piece, bytes):
                yield piece
            elif piece[0] is None:
                yield from zero_chunks(piece[1])
            else:
                yield from image.read_segments(self.volume.segments(piece[0], piece[1]))

    def content_segments(self, node: Inode, where: bytes, limit: int) -> list[Segment] | None:
        for _offset, raw in node.extents or ():
            # Inline or compressed content is read through read_chunks: decided from the item headers, so
            # planning (one thread, before hashing) never inflates anything.
            if len(raw) < 21 or raw[20] == EXTENT_INLINE or (raw[20] == EXTENT_REG and raw[16] != COMPRESS_NONE):
                return None
        runs: list[tuple[int | None, int]] = []
        for piece in self.pieces(node, where):
            if isinstance(piece, bytes):
                return None  # inline or compressed: read through read_chunks
            runs.append(piece)
        return plan_segments(runs, self.volume.segments, limit)

    def read_all(self, node: Inode, where: bytes, limit: int) -> bytes:
        if node.size > limit:
            raise ImageError(f"{self.label}: {_p(where)}: {node.size} bytes exceed the limit of {limit}")
        return b"".join(bytes(c) for c in self.read_chunks(node, where))

    def head(self, node: Inode, where: bytes) -> bytes:
        out = b""
        for chunk in self.read_chunks(node, where):
            out += bytes(chunk[: HEAD_BYTES - len(out)])
            if len(out) >= min(HEAD_BYTES, node.size):
                break
        return out

    # --- directories and walking -----------------------------------------------------------------------

    def dir_entries(self, node: Inode, where: bytes) -> Iterator[tuple[bytes, int]]:
        """Entries of a directory, nested subvolumes left out (each is a filesystem of its own)."""
        if node.size > self.limits.max_dir_bytes:
            raise ImageError(f"{self.label}: {_p(where)}: directory larger than {self.limits.max_dir_bytes} bytes")
        for name, loc, kind in node.entries or ():
            if not name or b"/" in name or b"\x00" in name or name in (b".", b".."):
                raise ImageError(f"{self.label}: {_p(where)}: directory entry with an invalid name")
            if kind == ROOT_ITEM:
                continue
            if kind != INODE_ITEM:
                raise ImageError(f"{self.label}: {_p(where)}: directory entry of key type {kind}")
            yield name, loc

    def root_node(self) -> Inode:
        root = self.inode(self.root_dirid, b"/")
        if not stat.S_ISDIR(root.mode):
            raise ImageError(f"{self.label}: the root inode is not a directory")
        return root

    def mode_of(self, node: Inode) -> int:
        return node.mode

    def ino_of(self, node: Inode) -> int:
        return node.ino

    def node_stat(self, node: Inode, path: bytes) -> NodeStat:
        return NodeStat(node.mode, node.ino, node.uid, node.gid, node.size, node.nlink)

    def capability(self, node: Inode, where: bytes) -> bytes | None:
        return node.capability


def _xattr_value(data: memoryview, wanted: bytes, label: str) -> bytes | None:
    pos = 0
    while pos + 30 <= len(data):
        _obj, _kind, _off, data_len, name_len, _ftype = _DIR.unpack_from(data, pos)
        name = bytes(data[pos + 30 : pos + 30 + name_len])
        if name == wanted:
            return bytes(data[pos + 30 + name_len : pos + 30 + name_len + data_len])
        pos += 30 + name_len + data_len
    return None


def _zstd() -> Any:
    if sys.version_info >= (3, 14):
        from compression import zstd  # type: ignore[import-not-found, unused-ignore]
    else:
        from backports import zstd
    return zstd


def _lzo(data: bytes, ram_bytes: int, sector: int) -> bytes:
    """Btrfs's LZO framing (fs/btrfs/lzo.c): total length, then per segment a length and the LZO1X data;
    a segment header never straddles a sector (padding skipped)."""
    from dissect.util.compression import lzo

    if len(data) < 4:
        raise ValueError("truncated LZO extent")
    total = min(struct.unpack_from("<I", data, 0)[0], len(data))
    pos, out = 4, bytearray()
    worst = sector + sector // 16 + 64 + 3
    while pos + 4 <= total and len(out) < ram_bytes:
        left = sector - pos % sector
        if left < 4:
            pos += left
            continue
        seg = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if seg == 0 or seg > worst or pos + seg > total:
            raise ValueError(f"LZO segment of {seg} bytes")
        out += lzo.decompress(bytes(data[pos : pos + seg]), False, sector)
        pos += seg
    return bytes(out)


def open_subvolumes(volume: Volume, limits: Limits) -> list[BtrfsSubvolume]:
    fs = BtrfsFilesystem(volume, limits)
    return [BtrfsSubvolume(fs, sid, path, tree, dirid) for sid, path, tree, dirid in fs.subvolumes()]
