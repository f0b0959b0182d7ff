"""The inventory of a base image seen through overlays, reading only what the overlays could have changed.

Inputs: the base's `DiskIndex` (built once, cached by the base's digest), a fast reader on the base alone, a
fast reader on the effective view (the chain, journal replayed) and the guest byte ranges the overlays
allocate. Output: exactly the file list that `inventory()` of the effective view would give (the unit tests
hold the two to equality over many kinds of change), and how it was found.

1. Nothing allocated: the view is the base, byte for byte: the cached file list is the answer.
2. The structure must match the index: the same filesystems at the same places with the same geometry
   (inode-table locations included) and the same layout (fstab, re-read from the view). Otherwise, or if
   anything below is in doubt, a full inventory of the view is taken instead.
3. Candidate blocks: per filesystem, the blocks the overlays allocate, plus the blocks a journal replay
   rewrites (in either view). Only candidates can differ between the two views.
4. Dirty inodes: an indexed inode whose bytes in an inode-table candidate block differ between the views
   (atime and checksums aside), or one of whose dependency blocks (content, extent tree, xattr block; see
   `diskindex`) differs. Candidates nothing depends on are never read.
5. The tree is revisited only along the paths to dirty inodes: a dirty directory's entries are read from the
   view and compared by name with the index; an entry that is gone or points elsewhere drops the indexed
   subtree from the result, and a new one is walked in full in the view (its files' digests are reused
   when the inode and its blocks are unchanged, e.g. a directory moved); a dirty file is classified again,
   and hashed again unless its extent map and blocks are unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hostguard.errors import ImageError
from hostguard.imagefs import FsNode, NodeKind
from hostguard.imagefs.diskindex import DiskIndex, FsIndex, fs_info_key, hash_nodes, layout_json, read_layout
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.indexing import IndexedFs, Indexing, indexing_for
from hostguard.imagefs.inventory import component_facts, inventory, is_executable_component, manifest_path
from hostguard.imagefs.layout import Layout
from hostguard.record import Record, field
from hostguard.signed.manifest import FileEntry

COMPARE_CHUNK_BLOCKS = 256
HASH_BATCH = 4096  # files hashed at a time: their nodes (inode bytes and all) are not kept for the whole walk
Ranges = list[tuple[int, int]]  # (start, length) or (start, end) as documented per use


class DeltaStats(Record, frozen=False):
    mode: str = "unchanged"  # unchanged | incremental | full
    reason: str = ""
    changed_bytes: int = 0  # guest bytes the overlays allocate
    candidate_blocks: int = 0
    compared_blocks: int = 0
    dirty_inodes: int = 0
    walked_nodes: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    seconds: float = 0.0
    replayed_blocks: int = 0

    def to_json(self) -> dict[str, object]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class _Fallback(Exception):
    """The index does not describe the view: take a full inventory (the message says why)."""


def effective_inventory(
    index: DiskIndex, base: FastReader, view: FastReader, changed: Sequence[Ranges]
) -> tuple[tuple[FileEntry, ...], DeltaStats]:
    """The view's file list. `changed[i]`: merged (offset, length) guest ranges the overlays of disk i allocate."""
    started = time.monotonic()
    stats = DeltaStats(changed_bytes=sum(n for ranges in changed for _, n in ranges))
    try:
        if stats.changed_bytes == 0:
            files = index.files
        else:
            stats.mode = "incremental"
            files = _Delta(index, base, view, changed, stats).run()
    except _Fallback as why:
        stats.mode, stats.reason = "full", str(why)
        result = inventory(view)
        stats.replayed_blocks = _replayed_blocks(view)
        files = result.files
        stats.hashed_files, stats.hashed_bytes, stats.walked_nodes = (
            result.hashed_files,
            result.hashed_bytes,
            result.nodes,
        )
    stats.seconds = time.monotonic() - started
    return files, stats


def _replayed_blocks(view: FastReader) -> int:
    """Blocks the journal/log replays of the view's filesystems rewrite (the figure the incremental path counts)."""
    total = 0
    for info in view.filesystems():
        try:
            fs = view.indexed_filesystem(info)
        except ImageError:
            continue  # no index for this type (Btrfs): nothing replayed either
        total += sum(1 for _ in indexing_for(fs).replayed_blocks(fs))
    return total


class _FsRun(Record, frozen=False):
    idx: FsIndex
    base: IndexedFs
    view: IndexedFs
    kind: Indexing
    inode_changed: set[int] = field(default_factory=set)
    blocks_changed: set[int] = field(default_factory=set)

    @property
    def dirty(self) -> set[int]:
        return self.inode_changed | self.blocks_changed


class _Delta:
    def __init__(
        self, index: DiskIndex, base: FastReader, view: FastReader, changed: Sequence[Ranges], stats: DeltaStats
    ) -> None:
        self.index = index
        self.base = base
        self.view = view
        self.changed = changed
        self.stats = stats
        self.limits = view.limits
        self.result: dict[str, FileEntry] = {f.path: f for f in index.files}
        self.count = [0]
        self.layout = Layout({})
        # Entries whose digest is read from the view: manifest path -> (inode key, size, mode, uid, gid, caps),
        # a few small values each (a hostile guest adds hundreds of thousands); a text is never also in `result`.
        self.pending: dict[str, tuple[tuple[str, int], int, int, int, int, str | None]] = {}
        self.to_hash: dict[tuple[str, int], FsNode] = {}  # by inode (hard links hashed once), in batches
        self.digests: dict[tuple[str, int], str] = {}
        self.slack = 0  # files that removals still to come may take out of `result` (see `_bound`)

    # --- structure -----------------------------------------------------------------------------------

    def _check_structure(self) -> dict[str, _FsRun]:
        infos = self.view.filesystems()
        if [fs_info_key(f) for f in infos] != self.index.filesystems:
            raise _Fallback("the filesystems differ from the base image's")
        runs: dict[str, _FsRun] = {}
        base_infos = {f.locator: f for f in self.base.filesystems()}
        for info in infos:
            idx = self.index.fs.get(info.locator)
            if idx is None or info.locator not in base_infos:
                raise _Fallback(f"{info.locator}: not in the index")
            view_fs = self.view.indexed_filesystem(info)
            kind = indexing_for(view_fs)
            if kind.geometry(view_fs) != idx.geometry or kind.inode_tables(view_fs) != idx.inode_tables:
                raise _Fallback(f"{info.locator}: filesystem geometry changed")
            base_fs = self.base.indexed_filesystem(base_infos[info.locator])
            if base_fs.volume.image_runs() != view_fs.volume.image_runs():
                raise _Fallback(f"{info.locator}: the volume moved on the disk")
            runs[info.locator] = _FsRun(idx, base_fs, view_fs, kind)
            self.stats.replayed_blocks += len(list(kind.replayed_blocks(view_fs)))
        self.layout = read_layout(self.view)
        if layout_json(self.layout) != self.index.layout:
            raise _Fallback("the mount layout (fstab) changed")
        return runs

    # --- dirty inodes --------------------------------------------------------------------------------

    def _candidates(self, run: _FsRun) -> list[tuple[int, int]]:
        """Sorted, merged [start, end) block intervals that may differ between the base and the view."""
        ext = run.view
        vol = ext.volume
        bs = ext.block_size
        disk = vol.image.index
        out: list[tuple[int, int]] = []
        # Image ranges -> volume blocks through every run of the volume on its image (one for a partition,
        # one per segment for an LVM logical volume).
        for at, where, size in vol.image_runs():
            for offset, length in self.changed[disk] if disk < len(self.changed) else ():
                lo, hi = max(offset, where), min(offset + length, where + size)
                if lo < hi:
                    out.append(((lo - where + at) // bs, -(-(hi - where + at) // bs)))
        out += [(b, b + 1) for b in run.kind.replayed_blocks(run.view)]
        out += [(b, b + 1) for b in run.kind.replayed_blocks(run.base)]
        out.sort()
        merged: list[tuple[int, int]] = []
        for s, e in out:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        return merged

    def _differs(self, run: _FsRun, start: int, end: int, memo: dict[tuple[int, int], bool]) -> bool:
        key = (start, end)
        if key in memo:
            return memo[key]
        bs = run.view.block_size
        pos = start
        result = False
        while pos < end:
            n = min(COMPARE_CHUNK_BLOCKS, end - pos)
            self.stats.compared_blocks += n
            if run.view.read(pos * bs, n * bs) != run.base.read(pos * bs, n * bs):
                result = True
                break
            pos += n
        memo[key] = result
        return result

    def _find_dirty(self, run: _FsRun) -> None:
        idx = run.idx
        cands = self._candidates(run)
        self.stats.candidate_blocks += sum(e - s for s, e in cands)
        counter = [0]
        # (a) the indexed inodes' own bytes
        run.inode_changed |= run.kind.changed_inodes(run.view, run.base, idx, cands, counter)
        self.stats.compared_blocks += counter[0]
        memo: dict[tuple[int, int], bool] = {}
        for s, e in cands:
            # (b) dependency blocks
            for ino, lo, hi in idx.dependents(s, e):
                if ino not in run.blocks_changed and self._differs(run, lo, hi, memo):
                    run.blocks_changed.add(ino)

    # --- the tree ------------------------------------------------------------------------------------

    def _text(self, locator: str, path: bytes) -> str:
        return manifest_path(self.layout.guest_path(locator, path))

    def _marked(self, run: _FsRun, dirty: set[int]) -> set[int]:
        """Directories on the way from the root to a dirty inode."""
        marked: set[int] = set()
        todo = list(dirty)
        while todo:
            ino = todo.pop()
            for parent in run.idx.parents.get(ino, ()):
                if parent not in marked:
                    marked.add(parent)
                    todo.append(parent)
        return marked

    def _traverse(self, run: _FsRun) -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]:
        """(removals, additions) of (path, inode) found along the paths to dirty inodes."""
        idx, view = run.idx, run.view
        dirty = run.dirty
        marked = self._marked(run, dirty)
        removals: list[tuple[bytes, int]] = []
        additions: list[tuple[bytes, int]] = []
        if idx.root not in dirty and idx.root not in marked:
            return removals, additions
        stack: list[tuple[bytes, int]] = [(b"", idx.root)]
        while stack:
            path, d = stack.pop()
            base_entries = idx.dirs[d]
            if d in dirty:
                inode = view.inode(d, path or b"/")
                if not run.kind.is_dir(inode):
                    raise ImageError(f"{view.label}: {path or b'/'!r} is no longer a directory")
                view_entries: dict[bytes, int] = {}
                for name, ino in view.dir_entries(inode, path or b"/"):
                    if name in view_entries:
                        raise ImageError(f"{view.label}: {path!r}: directory lists {name!r} twice")
                    view_entries[name] = ino
            else:
                view_entries = base_entries
            for name in base_entries.keys() | view_entries.keys():
                b, e = base_entries.get(name), view_entries.get(name)
                child = path + b"/" + name
                if b is not None and b == e:
                    if b in dirty:
                        if idx.kinds[b] == "d" and run.kind.is_dir(view.inode(b, child)):
                            stack.append((child, b))
                        else:
                            removals.append((child, b))
                            additions.append((child, b))
                    elif idx.kinds[b] == "d" and b in marked:
                        stack.append((child, b))
                    continue
                if b is not None:
                    removals.append((child, b))
                if e is not None:
                    additions.append((child, e))
        return removals, additions

    def _remove(self, run: _FsRun, path: bytes, ino: int, reachable: set[int]) -> None:
        idx = run.idx
        stack = [(path, ino)]
        while stack:
            p, i = stack.pop()
            self.count[0] -= 1
            kind = idx.kinds.get(i)
            if kind == "f":
                self.result.pop(self._text(idx.locator, p), None)
            elif kind == "d":
                reachable.discard(i)
                stack.extend((p + b"/" + n, c) for n, c in idx.dirs.get(i, {}).items())

    def _add(self, run: _FsRun, path: bytes, ino: int, reachable: set[int]) -> None:
        view = run.view
        self.count[0] += 1
        inode = view.inode(ino, path)
        node = view.node_for(path, inode)
        if node.kind is NodeKind.DIR:
            if ino in reachable:
                raise ImageError(f"{view.label}: {path!r}: directory inode {ino} reached twice (cycle)")
            for child, child_inode in view.walk(self.count, start=(path, inode), visited=reachable):
                self.stats.walked_nodes += 1
                if child.kind is NodeKind.FILE:
                    self._consider(run, child, child_inode)
        elif node.kind is NodeKind.FILE:
            self._consider(run, node, inode)

    def _consider(self, run: _FsRun, node: FsNode, inode: object) -> None:
        info_loc = run.idx.locator
        guest = self.layout.guest_path(info_loc, node.path)
        if not is_executable_component(guest, node):
            return
        info = next(f for f in self.view.filesystems() if f.locator == info_loc)
        text, caps = component_facts(info, guest, node, self.limits)
        digest = self._known_digest(run, inode)
        if digest is not None:
            if text not in self.pending:  # else the pending entry wins, as it is written last
                self.result[text] = FileEntry(text, digest, node.size, node.mode, node.uid, node.gid, caps)
                self._bound()
            return
        self.result.pop(text, None)
        key = (info_loc, run.kind.ino(inode))
        self.pending[text] = (key, node.size, node.mode, node.uid, node.gid, caps)
        self._bound()
        if key not in self.digests and key not in self.to_hash:
            self.to_hash[key] = node
            if len(self.to_hash) >= HASH_BATCH:
                self._hash_batch()

    def _bound(self) -> None:
        """Fail as soon as the list is sure to exceed `max_files`, not after holding all of a hostile guest's
        files: additions only grow it, and removals still to come take at most `slack` entries out."""
        if len(self.result) + len(self.pending) - self.slack > self.limits.max_files:
            raise ImageError(f"more than {self.limits.max_files} executable components")

    def _hash_batch(self) -> None:
        keys = list(self.to_hash)
        nodes = [self.to_hash[k] for k in keys]
        self.digests.update(zip(keys, hash_nodes(self.view, nodes), strict=True))
        self.stats.hashed_files += len(nodes)
        self.stats.hashed_bytes += sum(n.size for n in nodes)
        self.to_hash.clear()

    def _known_digest(self, run: _FsRun, inode: object) -> str | None:
        ino = run.kind.ino(inode)
        digest = run.idx.digests.get(ino)
        if digest is None or ino in run.blocks_changed:
            return None
        if ino not in run.inode_changed:
            return digest  # the inode and every block it reads from are the base's
        if not run.kind.same_content(run.base, run.view, run.base.inode(ino, b"<base>"), inode):
            return None
        return digest  # only attributes changed (mode, owner, times, xattrs): the content is the base's

    # --- the whole run -------------------------------------------------------------------------------

    def run(self) -> tuple[FileEntry, ...]:
        runs = self._check_structure()
        self.count[0] = sum(r.idx.nodes for r in runs.values())
        plans = []
        for run in runs.values():
            self._find_dirty(run)
            self.stats.dirty_inodes += len(run.dirty)
            plans.append((run, *self._traverse(run)))
        self.slack = sum(r.idx.nodes for r in runs.values())
        for run, removals, additions in plans:
            self.slack -= run.idx.nodes  # this filesystem's removals come first, then only later ones'
            reachable = set(run.idx.dirs)
            for path, ino in removals:
                self._remove(run, path, ino, reachable)
            for path, ino in additions:
                self._add(run, path, ino, reachable)
        if self.count[0] > self.limits.max_nodes:
            raise ImageError(f"more than {self.limits.max_nodes} directory entries")
        self._hash_batch()
        for text, (key, size, mode, uid, gid, caps) in self.pending.items():
            self.result[text] = FileEntry(text, self.digests[key], size, mode, uid, gid, caps)
        if len(self.result) > self.limits.max_files:
            raise ImageError(f"more than {self.limits.max_files} executable components")
        return tuple(sorted(self.result.values()))
