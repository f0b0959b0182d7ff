"""What the incremental disk check (`imagefs.diskindex`, `imagefs.incremental`) needs from one filesystem type.

The index and the delta are filesystem-independent: a tree of directories (inode numbers), the blocks each
directory's entries and each file's content are read from, and a way to tell which indexed inodes differ
between two views of one volume given the blocks that may differ. Each filesystem type supplies that
through one `Indexing` (ext: `imagefs.extindex`, XFS: `imagefs.xfsindex`); a new type adds its own module
and one line in `indexing_for`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from hostguard.errors import ImageError
from hostguard.imagefs.extfs import ExtFilesystem
from hostguard.imagefs.extindex import EXT
from hostguard.imagefs.xfsfs import XfsFilesystem
from hostguard.imagefs.xfsindex import XFS

if TYPE_CHECKING:
    from hostguard.imagefs import FsNode
    from hostguard.imagefs.diskindex import FsIndex
    from hostguard.imagefs.partitions import Volume


class IndexedFs(Protocol):
    """The filesystem object (`ExtFilesystem`, `XfsFilesystem`) as the index and the delta use it."""

    volume: Volume
    label: str
    block_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def inode(self, ino: int, where: bytes) -> Any: ...

    def dir_entries(self, inode: Any, where: bytes) -> Iterator[tuple[bytes, int]]: ...

    def node_for(self, path: bytes, inode: Any) -> FsNode: ...

    def walk(
        self, count: list[int], *, start: tuple[bytes, Any] | None = None, visited: set[int] | None = None
    ) -> Iterator[tuple[FsNode, Any]]: ...


class Indexing(Protocol):
    """One filesystem type's part of the incremental check. `fs` arguments are that type's filesystem objects."""

    def geometry(self, fs: Any) -> list[int]:
        """What must be equal for an index of one view to describe the inodes and blocks of another."""

    def inode_tables(self, fs: Any) -> list[int]:
        """Fixed inode locations kept in the index (ext's inode tables; [] where inode numbers are locations)."""

    def root_ino(self, fs: Any) -> int: ...

    def ino(self, inode: Any) -> int: ...

    def is_dir(self, inode: Any) -> bool: ...

    def replayed_blocks(self, fs: Any) -> Iterable[int]:
        """Blocks a journal/log replay in memory rewrites (they may differ without the overlays writing them)."""

    def dependencies(self, fs: Any, inode: Any, where: bytes) -> list[int]:
        """Blocks, as flat (start, count) pairs, that a directory's entries or a file's content and capability
        are read from, besides the inode's own bytes (which `changed_inodes` finds)."""

    def changed_inodes(
        self, view: Any, base: Any, idx: FsIndex, intervals: list[tuple[int, int]], counter: list[int]
    ) -> set[int]:
        """Indexed inodes (`idx.kinds`) whose own bytes in the merged block `intervals` differ between the views
        in anything the inventory reads. `counter[0]` counts the blocks compared."""

    def same_content(self, base: Any, view: Any, old: Any, new: Any) -> bool:
        """True if a file inode that changed (only attributes) still maps the same content as the base's."""


def indexing_for(fs: object) -> Indexing:
    if isinstance(fs, ExtFilesystem):
        return EXT
    if isinstance(fs, XfsFilesystem):
        return XFS
    raise ImageError(f"{type(fs).__name__}: no incremental index for this filesystem")
