"""Path resolution and the bounded tree walk inside one filesystem, shared by the fast reader's filesystems (ext,
XFS, Btrfs subvolumes)."""

from __future__ import annotations

import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, NamedTuple, TypeVar

from hostguard.errors import ImageError
from hostguard.imagefs import FsNode, Limits, NodeKind
from hostguard.imagefs.extmap import path_text

N = TypeVar("N")


def resolve(
    path: bytes,
    root: N,
    *,
    mode: Callable[[N], int],
    entries: Callable[[N, bytes], Iterator[tuple[bytes, int]]],
    load: Callable[[int, bytes], N],
    link_target: Callable[[N, bytes], bytes],
    max_follows: int,
    label: str,
) -> N | None:
    """The node at absolute `path`, following symlinks (at most `max_follows`, as Linux's MAXSYMLINKS);
    None if absent or a component is not a directory."""
    chain: list[tuple[bytes, N]] = []
    parts = [p for p in path.split(b"/") if p]
    follows = 0
    while parts:
        name = parts.pop(0)
        if name == b".":
            continue
        if name == b"..":
            if chain:
                chain.pop()
            continue
        current = chain[-1][1] if chain else root
        if not stat.S_ISDIR(mode(current)):
            return None
        where = b"/" + b"/".join([n for n, _ in chain] + [name])
        found = next((ino for n, ino in entries(current, where) if n == name), None)
        if found is None:
            return None
        child = load(found, where)
        if stat.S_ISLNK(mode(child)):
            follows += 1
            if follows > max_follows:
                raise ImageError(f"{label}: {path_text(where)}: too many levels of symbolic links")
            target = link_target(child, where)
            if target.startswith(b"/"):
                chain = []
            parts = [p for p in target.split(b"/") if p] + parts
            continue
        chain.append((name, child))
    return chain[-1][1] if chain else root


KINDS = {
    stat.S_IFDIR: NodeKind.DIR,
    stat.S_IFREG: NodeKind.FILE,
    stat.S_IFLNK: NodeKind.SYMLINK,
    stat.S_IFCHR: NodeKind.OTHER,
    stat.S_IFBLK: NodeKind.OTHER,
    stat.S_IFIFO: NodeKind.OTHER,
    stat.S_IFSOCK: NodeKind.OTHER,
}


def node_kind(mode: int, label: str, path: bytes, ino: int) -> NodeKind:
    """The kind of an inode by its mode; an invalid file type is an `ImageError`."""
    kind = KINDS.get(stat.S_IFMT(mode))
    if kind is None:
        raise ImageError(f"{label}: {path_text(path)}: inode {ino} has invalid mode {mode:#o}")
    return kind


def inode_node(
    path: bytes,
    mode: int,
    *,
    label: str,
    ino: int,
    uid: int,
    gid: int,
    size: int,
    nlink: int,
    handle: object,
    capability: Callable[[], bytes | None],
    head: Callable[[], bytes],
) -> FsNode:
    """The node of an inode found at `path`: its kind from `mode` (invalid: `ImageError`); a regular file
    carries its capability xattr and, without an x bit, its first bytes (the component rule needs them)."""
    kind = node_kind(mode, label, path, ino)
    regular = kind is NodeKind.FILE
    return FsNode(
        path=path,
        kind=kind,
        mode=mode & 0o7777,
        uid=uid,
        gid=gid,
        size=size,
        inode=ino,
        nlink=nlink,
        capability=capability() if regular else None,
        head=head() if regular and not mode & 0o111 else b"",
        handle=handle,
    )


def walk_tree(
    start: tuple[bytes, N],
    start_ino: int,
    visited: set[int],
    count: list[int],
    *,
    limits: Limits,
    label: str,
    entries: Callable[[N, bytes], Iterable[tuple[bytes, int]]],
    load: Callable[[int, bytes], N],
    node_for: Callable[[bytes, N], FsNode],
) -> Iterator[tuple[FsNode, N]]:
    """Every node below `start` (path, directory node), depth first, with its filesystem node. `count[0]` counts
    nodes across calls against `limits.max_nodes`; `visited` (directory inode numbers) refuses cycles."""
    visited.add(start_ino)
    stack: list[tuple[bytes, N]] = [start]
    while stack:
        prefix, directory = stack.pop()
        for name, ino in entries(directory, prefix or b"/"):
            path = prefix + b"/" + name
            count[0] += 1
            if count[0] > limits.max_nodes:
                raise ImageError(f"{label}: more than {limits.max_nodes} directory entries")
            if len(path) > limits.max_path_bytes:
                raise ImageError(f"{label}: {path_text(path)}: path longer than {limits.max_path_bytes} bytes")
            node = load(ino, path)
            fs_node = node_for(path, node)
            if fs_node.kind is NodeKind.DIR:
                if ino in visited:
                    raise ImageError(f"{label}: {path_text(path)}: directory inode {ino} reached twice (cycle)")
                visited.add(ino)
                stack.append((path, node))
            yield fs_node, node


class NodeStat(NamedTuple):
    """What `inode_node` takes from an inode, whatever the filesystem calls it."""

    mode: int
    ino: int
    uid: int
    gid: int
    size: int
    nlink: int


class TreeFs(ABC, Generic[N]):
    """`walk`, `lookup` and `node_for` of one filesystem (ext, XFS, a Btrfs subvolume) whose nodes are `N`: the
    class says how to load a node, its mode, inode number and other `NodeStat`, its directory entries, its
    capability xattr and first bytes."""

    label: str
    limits: Limits

    @abstractmethod
    def root_node(self) -> N:
        """The root directory's node (`walk` refuses one that is not a directory)."""

    @abstractmethod
    def mode_of(self, node: N) -> int: ...

    @abstractmethod
    def ino_of(self, node: N) -> int: ...

    @abstractmethod
    def inode(self, ino: int, where: bytes) -> N: ...

    @abstractmethod
    def dir_entries(self, node: N, where: bytes) -> Iterator[tuple[bytes, int]]: ...

    @abstractmethod
    def read_all(self, node: N, where: bytes, limit: int) -> bytes: ...

    @property
    @abstractmethod
    def locator(self) -> str: ...

    @abstractmethod
    def node_stat(self, node: N, path: bytes) -> NodeStat:
        """The node's `NodeStat`; may refuse a node the reader cannot read (`UnsupportedLayout`)."""

    @abstractmethod
    def capability(self, node: N, where: bytes) -> bytes | None: ...

    @abstractmethod
    def head(self, node: N, where: bytes) -> bytes: ...

    def walk_entries(self, node: N, where: bytes) -> Iterable[tuple[bytes, int]]:
        """A directory's entries as the walk takes them: read whole by default (dissect's iterators)."""
        return list(self.dir_entries(node, where))

    def symlink_target(self, node: N, where: bytes) -> bytes:
        return self.read_all(node, where, self.limits.max_path_bytes)

    def node_for(self, path: bytes, node: N) -> FsNode:
        """The `FsNode` of `node`, found at `path` (`inode_node`); its handle is (locator, node)."""
        st = self.node_stat(node, path)
        return inode_node(
            path,
            st.mode,
            label=self.label,
            ino=st.ino,
            uid=st.uid,
            gid=st.gid,
            size=st.size,
            nlink=st.nlink,
            handle=(self.locator, node),
            capability=lambda: self.capability(node, path),
            head=lambda: self.head(node, path),
        )

    def walk(
        self, count: list[int], *, start: tuple[bytes, N] | None = None, visited: set[int] | None = None
    ) -> Iterator[tuple[FsNode, N]]:
        """Every node below the root (depth first), with its inode. `count[0]` counts nodes across calls.

        With `start` = (path, directory node), only the tree below that directory; `visited` (directory
        inodes already reached, updated here) extends the cycle check across calls."""
        if start is None:
            root = self.root_node()
            if not stat.S_ISDIR(self.mode_of(root)):
                raise ImageError(f"{self.label}: the root inode is not a directory")
            start = (b"", root)
        yield from walk_tree(
            start,
            self.ino_of(start[1]),
            set() if visited is None else visited,
            count,
            limits=self.limits,
            label=self.label,
            entries=self.walk_entries,
            load=self.inode,
            node_for=self.node_for,
        )

    def lookup(self, path: bytes) -> N | None:
        """Resolve an absolute path inside this filesystem, following symlinks (bounded); None if absent."""
        return resolve(
            path,
            self.root_node(),
            mode=self.mode_of,
            entries=self.dir_entries,
            load=self.inode,
            link_target=self.symlink_target,
            max_follows=self.limits.max_symlink_follows,
            label=self.label,
        )
