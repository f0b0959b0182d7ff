"""An inventory of a base image that also remembers what each result depends on, so an overlay's view of it
can be re-inventoried by reading only what the overlay changed (`imagefs.incremental`).

`build_index(reader)` walks every filesystem of a fast reader once, as `hostguard.imagefs.inventory.inventory` does
(same component rule, limits and layout, and the same file list: the tests hold them to it), and keeps:

* the file list (manifest entries) and the layout (which filesystem is mounted where);
* per filesystem, its geometry (block and inode sizes, ext's inode-table locations, features; per filesystem
  type, `imagefs.indexing`) and the volume's place on the disk: if any of it differs in the overlay's view,
  nothing is reused;
* the tree's shape: every directory's entries (name -> inode number) and every inode's kind;
* the digest of every hashed file, by inode;
* dependencies: for every directory and regular file, the blocks its part of the result was read from
  (content, extent-tree or indirect blocks, ext's xattr block). An inode's own bytes are found from the
  geometry (ext's inode tables, XFS's inode numbers), so they need no entry.

An index is plain JSON (`to_json`/`from_json`), cached in the state directory keyed by the base image's
digest (`hostguard.poststart.disk_stage`).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hostguard import __version__
from hostguard.errors import HostguardError, ImageError
from hostguard.imagefs import FilesystemInfo, FsNode, NodeKind
from hostguard.imagefs.extfs import INCOMPAT_EA_INODE, ExtFilesystem
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.indexing import indexing_for
from hostguard.imagefs.inventory import _malformed, component_facts, inventory, is_executable_component
from hostguard.imagefs.layout import FSTAB, Layout, plan
from hostguard.record import Record, field
from hostguard.signed.manifest import FileEntry, parse_file_entry

INDEX_FORMAT = "hostguard-disk-index/1"
KIND_CODES = {NodeKind.DIR: "d", NodeKind.FILE: "f", NodeKind.SYMLINK: "l", NodeKind.OTHER: "o"}


class FsIndex(Record, frozen=False):
    locator: str
    geometry: list[int]
    inode_tables: list[int]
    dirs: dict[int, dict[bytes, int]]  # directory inode -> {name: inode}
    kinds: dict[int, str]  # inode -> d f l o
    digests: dict[int, str]  # regular-file inode -> sha256 (files that were hashed)
    deps: dict[int, list[int]]  # inode -> flat (start block, count) pairs
    nodes: int
    root: int = 2  # the root directory's inode (ext: 2)
    # Derived at load time:
    parents: dict[int, list[int]] = field(default_factory=dict)
    _starts: list[int] = field(default_factory=list)
    _ends: list[int] = field(default_factory=list)
    _maxend: list[int] = field(default_factory=list)
    _owners: list[int] = field(default_factory=list)
    # Filled by a filesystem type's part on first use, in one assignment (checks may share an index):
    # XFS's (byte offsets sorted, their inodes) (imagefs.xfsindex).
    located: tuple[list[int], list[int]] | None = None

    def prepare(self) -> None:
        parents: dict[int, list[int]] = {}
        for d, entries in self.dirs.items():
            for child in entries.values():
                parents.setdefault(child, []).append(d)
        self.parents = parents
        spans = sorted(
            (pairs[i], pairs[i] + pairs[i + 1], ino)
            for ino, pairs in self.deps.items()
            for i in range(0, len(pairs), 2)
        )
        self._starts = [s for s, _, _ in spans]
        self._ends = [e for _, e, _ in spans]
        self._owners = [o for _, _, o in spans]
        running = 0
        self._maxend = []
        for e in self._ends:
            running = max(running, e)
            self._maxend.append(running)

    def dependents(self, start: int, end: int) -> Iterable[tuple[int, int, int]]:
        """(inode, first block, end block) of every dependency overlapping blocks [start, end)."""
        i = bisect.bisect_left(self._starts, end) - 1
        while i >= 0 and self._maxend[i] > start:
            if self._ends[i] > start:
                yield self._owners[i], max(start, self._starts[i]), min(end, self._ends[i])
            i -= 1

    def to_json(self) -> dict[str, Any]:
        return {
            "geometry": self.geometry,
            "inode_tables": self.inode_tables,
            "dirs": {str(d): [[_name(n), i] for n, i in entries.items()] for d, entries in self.dirs.items()},
            "kinds": "".join(f"{ino}{k}" for ino, k in self.kinds.items()),
            "digests": {str(i): d for i, d in self.digests.items()},
            "deps": {str(i): p for i, p in self.deps.items()},
            "nodes": self.nodes,
            "root": self.root,
        }

    @classmethod
    def from_json(cls, locator: str, doc: dict[str, Any]) -> FsIndex:
        import re

        kinds = {int(n): k for n, k in re.findall(r"(\d+)([dflo])", doc["kinds"])}
        idx = cls(
            locator=locator,
            geometry=[int(x) for x in doc["geometry"]],
            inode_tables=[int(x) for x in doc["inode_tables"]],
            dirs={int(d): {_unname(n): int(i) for n, i in entries} for d, entries in doc["dirs"].items()},
            kinds=kinds,
            digests={int(i): str(d) for i, d in doc["digests"].items()},
            deps={int(i): [int(x) for x in p] for i, p in doc["deps"].items()},
            nodes=int(doc["nodes"]),
            root=int(doc.get("root", 2)),
        )
        idx.prepare()
        return idx


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _unname(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def fs_info_key(info: FilesystemInfo) -> list[Any]:
    """A filesystem's identity for comparing two views of one disk set (not its reader-specific device)."""
    label = info.label.hex() if info.label is not None else None
    return [info.locator, info.fstype, info.image_index, info.partition, info.uuid, label, info.partuuid,
            info.partlabel]  # fmt: skip


class DiskIndex(Record, frozen=False):
    digests: list[str]  # the base images', in disk order: the cache key
    filesystems: list[list[Any]]  # fs_info_key of each
    layout: dict[str, str]  # locator -> mountpoint (surrogateescape text)
    files: tuple[FileEntry, ...]
    fs: dict[str, FsIndex]
    seconds: float = 0.0
    hashed_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "hostguard": __version__,
            "digests": self.digests,
            "filesystems": self.filesystems,
            "layout": self.layout,
            "files": [f.to_json() for f in self.files],
            "fs": {loc: x.to_json() for loc, x in self.fs.items()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DiskIndex:
        """Raises KeyError/ValueError/TypeError on anything but an index this version wrote."""

        if doc.get("format") != INDEX_FORMAT or doc.get("hostguard") != __version__:
            raise ValueError("index of another format or hostguard version")
        try:
            files = tuple(parse_file_entry(f) for f in doc["files"])
        except HostguardError as err:
            raise ValueError(str(err)) from None
        return cls(
            digests=[str(d) for d in doc["digests"]],
            filesystems=list(doc["filesystems"]),
            layout={str(k): str(v) for k, v in doc["layout"].items()},
            files=files,
            fs={loc: FsIndex.from_json(loc, x) for loc, x in doc["fs"].items()},
        )


def read_layout(reader: FastReader) -> Layout:
    fstabs: dict[str, bytes] = {}
    for fs in reader.filesystems():
        text = reader.read_file(fs, FSTAB, reader.limits.max_small_file)
        if text is not None:
            fstabs[fs.locator] = text
    return plan(reader.filesystems(), fstabs)


def layout_json(layout: Layout) -> dict[str, str]:
    return {loc: _name(point) for loc, point in layout.mounts.items()}


def hash_nodes(reader: FastReader, nodes: list[FsNode], workers: int | None = None) -> list[str]:
    """sha256 of each node's content, read by a pool of threads (os.pread and hashlib release the GIL)."""

    def one(node: FsNode) -> str:
        h = hashlib.sha256()
        size = 0
        for chunk in reader.read_chunks(node):
            h.update(chunk)
            size += len(chunk)
        if size != node.size:
            raise ImageError(f"{node.path!r}: read {size} bytes, the inode says {node.size}")
        return h.hexdigest()

    n = min(workers or os.cpu_count() or 1, len(nodes))
    if n <= 1:
        return [one(node) for node in nodes]
    with ThreadPoolExecutor(n, thread_name_prefix="hg-index") as pool:
        return list(pool.map(one, nodes))


def _incremental(reader: FastReader, info: FilesystemInfo) -> bool:
    """Can this filesystem be checked incrementally (ext, XFS)? Btrfs cannot yet (no block-to-inode index)."""
    try:
        indexing_for(reader.indexed_filesystem(info))
    except ImageError:
        return False
    return True


def build_index(reader: FastReader, digests: list[str]) -> DiskIndex:
    """Walk and hash every filesystem of `reader` (the base images) into an index. A disk with a filesystem that
    has no incremental index (Btrfs) gets a files-only index: an unchanged view is its files at once, a changed
    one is read in full (`incremental._check_structure` finds no per-filesystem index: ADR 0029)."""

    started = time.monotonic()
    if not all(_incremental(reader, info) for info in reader.filesystems()):
        result = inventory(reader)
        return DiskIndex(
            digests=digests,
            filesystems=[fs_info_key(f) for f in reader.filesystems()],
            layout=layout_json(read_layout(reader)),
            files=result.files,
            fs={},
            seconds=time.monotonic() - started,
            hashed_bytes=result.hashed_bytes,
        )
    layout = read_layout(reader)
    limits = reader.limits
    entries: list[tuple[str, int, str, FsNode, str | None]] = []  # (text, ino, locator, node, caps)
    to_hash: dict[tuple[str, int], FsNode] = {}
    indexes: dict[str, FsIndex] = {}
    count = [0]
    for info in reader.filesystems():
        fs = reader.indexed_filesystem(info)
        if isinstance(fs, ExtFilesystem) and fs.incompat & INCOMPAT_EA_INODE:
            raise ImageError(f"{info.device}: xattrs in inodes (ea_inode): no incremental index")
        kind = indexing_for(fs)
        root = kind.root_ino(fs)
        idx = FsIndex(info.locator, kind.geometry(fs), kind.inode_tables(fs), {root: {}}, {root: "d"}, {}, {}, 0)
        idx.root = root
        idx.deps[root] = kind.dependencies(fs, fs.inode(root, b"/"), b"/")
        dir_ino = {b"": root}
        guard = _malformed(info.device, b"/")
        with guard:
            for node, inode in fs.walk(count):
                guard.path = node.path
                parent, _, name = node.path.rpartition(b"/")
                ino = kind.ino(inode)
                idx.dirs[dir_ino[parent]][name] = ino
                idx.nodes += 1
                if ino not in idx.kinds:
                    idx.kinds[ino] = KIND_CODES[node.kind]
                    if node.kind in (NodeKind.DIR, NodeKind.FILE):
                        idx.deps[ino] = kind.dependencies(fs, inode, node.path)
                if node.kind is NodeKind.DIR:
                    dir_ino[node.path] = ino
                    idx.dirs[ino] = {}
                elif node.kind is NodeKind.FILE:
                    guest = layout.guest_path(info.locator, node.path)
                    if is_executable_component(guest, node):
                        if len(entries) >= limits.max_files:
                            raise ImageError(f"{info.device}: more than {limits.max_files} executable components")
                        text, caps = component_facts(info, guest, node, limits)
                        entries.append((text, ino, info.locator, node, caps))
                        to_hash.setdefault((info.locator, ino), node)
        indexes[info.locator] = idx
    keys = list(to_hash)
    nodes = [to_hash[k] for k in keys]
    digests_found = hash_nodes(reader, nodes)
    for (loc, ino), digest in zip(keys, digests_found, strict=True):
        indexes[loc].digests[ino] = digest
    files = tuple(
        sorted(
            FileEntry(text, indexes[loc].digests[ino], node.size, node.mode, node.uid, node.gid, caps)
            for text, ino, loc, node, caps in entries
        )
    )
    for idx in indexes.values():
        idx.prepare()
    return DiskIndex(
        digests=digests,
        filesystems=[fs_info_key(f) for f in reader.filesystems()],
        layout=layout_json(layout),
        files=files,
        fs=indexes,
        seconds=time.monotonic() - started,
        hashed_bytes=sum(n.size for n in nodes),
    )
