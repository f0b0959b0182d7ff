"""Read the guest filesystems inside disk images from the host, without mounting anything on the host kernel.

Two readers behind one interface (`GuestFilesystemReader`):

* `fast` (`imagefs.fast`): pure Python on the host. qcow2 through dissect.hypervisor's header parsing and a
  bounded L1/L2 mapper, MBR/GPT partitions with dissect.volume's table structures, linear LVM2 volumes
  (`imagefs.lvm`), ext2/3/4 through our own superblock parser and hardened inode/extent/directory walker
  (`imagefs.extfs`), XFS through dissect.xfs with our bounds (`imagefs.xfsfs`, ADR 0017), Btrfs subvolumes
  (`imagefs.btrfsfs`, ADR 0022). File content is read
  with `os.pread` on the image file, so worker threads hash in parallel.
* `guestfs` (`imagefs.guestfs_reader`): libguestfs, read-only, inside its appliance VM. Handles everything
  the kernel can mount (btrfs, vfat, thin or RAID LVM, ...) and is the reference the fast reader is tested against.

`imagefs.readers.open_reader(images, "auto")` uses the fast reader when it supports every filesystem on the images and
libguestfs otherwise. A reader lists the filesystems it found (`filesystems()`), reads small files for the
layout (`read_file`, used for /etc/fstab), walks one filesystem (`walk`, every node with its raw path
bytes), and gives file content (`read_chunks`) or, for libguestfs, a digest computed in the appliance.

Guest paths: `imagefs.layout` places each filesystem where the guest's /etc/fstab mounts it. A file that
the running guest cannot see at a normal path (on a filesystem that fstab does not mount, or hidden under
another filesystem's mountpoint) is named `//LOCATOR/path/inside/that/filesystem`, e.g. `//disk0p3/bin/x`;
a real guest path never starts with `//`. Locators: `diskN` (a filesystem on the whole N-th image, counted
from 0 in the order given), `diskNpM` (partition M of it, numbered as Linux numbers them), and for the
LVM logical volumes `lvm:VG:LV` (both readers), Btrfs subvolumes other than the top level
`diskNpM:subvolid=N` (both readers; the top level is the volume's own locator), and for the guestfs reader
only `md:NAME`, `dev:NAME`.
"""

from __future__ import annotations

import enum
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from hostguard.errors import ImageError, UsageError
from hostguard.record import Record, field

if TYPE_CHECKING:
    from hostguard.imagefs.disk import ContentPlan

ReaderChoice = Literal["auto", "fast", "guestfs"]
READER_CHOICES: tuple[str, ...] = ("auto", "fast", "guestfs")
IMAGE_FORMATS: tuple[str, ...] = ("raw", "qcow2")
HEAD_BYTES = 4  # enough for the ELF magic


class NodeKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"  # device, FIFO, socket


class Limits(Record):
    """Bounds that keep a hostile image from exhausting time or memory. Exceeding one is an `ImageError`."""

    max_nodes: int = 5_000_000  # directory entries walked, per inventory
    max_files: int = 250_000  # executable components listed
    max_path_bytes: int = 4096  # one guest path, raw bytes
    max_symlink_follows: int = 40  # as Linux's MAXSYMLINKS, when resolving /etc/fstab
    max_xattr_bytes: int = 65536  # one xattr value (XATTR_SIZE_MAX)
    max_dir_bytes: int = 1 << 30  # one directory's data
    max_file_bytes: int = 64 << 30  # one listed file's size
    max_extents: int = 4_000_000  # block runs of one file
    max_small_file: int = 1 << 20  # /etc/fstab
    # ext3/4 journal replay: log blocks walked plus revoke records. Twice the largest journal mke2fs makes by
    # default (262,144 blocks: file systems of 128 GiB and up); e2fsprogs makes up to 10,240,000 and the kernel
    # takes a journal inode of any size. A replay costs ~50 us and ~240-290 B of heap per checksummed data block
    # (tests/faults/test_hostile_journal.py): ~25 s and ~125 MiB at this bound.
    max_journal_blocks: int = 1 << 19


DEFAULT_LIMITS = Limits()


class FilesystemInfo(Record):
    """One filesystem a reader found. `locator` is stable across readers (see the module docstring)."""

    locator: str
    fstype: str  # "ext4", "xfs", ...
    image_index: int | None = None  # which image holds it (None: spans several, e.g. LVM)
    partition: int | None = None  # Linux partition number, None for a whole-disk filesystem
    uuid: str | None = None  # filesystem UUID, lower-case with hyphens (as blkid prints it)
    label: bytes | None = None
    partuuid: str | None = None  # GPT partition GUID, lower-case
    partlabel: str | None = None
    device: str = ""  # reader-specific name, for messages
    # Btrfs: each subvolume is a filesystem of its own (ADR 0022): its path from the top level ("" for the
    # top level, id 5), its id, and whether it is the filesystem's default subvolume (what fstab mounts
    # without a subvol=/subvolid= option). None/False for other filesystems.
    subvolume: str | None = None
    subvolid: int | None = None
    default_subvolume: bool = False


class FsNode(Record):
    """One directory entry. `path` is the raw path inside its filesystem ("/" + names joined by "/")."""

    path: bytes
    kind: NodeKind
    mode: int  # st_mode & 0o7777
    uid: int
    gid: int
    size: int
    inode: int | None = None  # identifies hard links within one filesystem (None if unknown)
    nlink: int = 1
    capability: bytes | None = None  # raw security.capability value (regular files)
    head: bytes = b""  # first HEAD_BYTES of a regular file's content
    digest: str | None = None  # sha256 hex when the reader already has it
    handle: object = field(default=None, compare=False, repr=False)  # reader-private content locator


class GuestFilesystemReader(ABC):
    """Read access to every filesystem on a set of disk images. Use as a context manager."""

    name: str = "reader"
    #: True when `read_chunks` may run in several threads at once.
    parallel_content: bool = False
    #: True when `digest` computes digests itself (e.g. inside the libguestfs appliance).
    remote_digest: bool = False

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    @abstractmethod
    def filesystems(self) -> tuple[FilesystemInfo, ...]:
        """Every filesystem found, in a stable order (by image, then partition)."""

    @abstractmethod
    def read_file(self, fs: FilesystemInfo, path: bytes, limit: int) -> bytes | None:
        """Content of a regular file (symlinks followed inside `fs`, bounded), None if absent; at most
        `limit` bytes or an `ImageError`."""

    @abstractmethod
    def walk(self, fs: FilesystemInfo) -> Iterator[FsNode]:
        """Every node of `fs` except its root directory, without following symlinks. Regular files carry
        `head` and `capability`. Raises `ImageError` on corruption or exceeded limits."""

    def read_chunks(self, node: FsNode) -> Iterator[bytes | memoryview]:
        """The content of a regular file from `walk`, streamed."""
        raise ImageError(f"{self.name} reader cannot stream file content")

    def content_plan(self, node: FsNode, max_segments: int) -> ContentPlan | None:
        """Where a regular file's content lies on the images, for a tight hashing loop; None when the reader
        has no such plan for it (then `read_chunks`). At most `max_segments` segments (else None)."""
        return None

    def digest(self, node: FsNode) -> str:
        """sha256 hex of a regular file from `walk` (readers with `remote_digest`)."""
        raise ImageError(f"{self.name} reader cannot compute digests")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and processes."""

    def __enter__(self) -> GuestFilesystemReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class UnsupportedLayout(ImageError):
    """The fast reader cannot read this image, libguestfs may: `open_reader("auto")` falls back on it."""


class ImageSpec(Record):
    path: Path
    format: str


def image_specs(images: Sequence[tuple[Path | str, str]]) -> tuple[ImageSpec, ...]:
    specs = []
    for path, fmt in images:
        if fmt not in IMAGE_FORMATS:
            raise UsageError(f"{path}: image format must be one of {', '.join(IMAGE_FORMATS)}, not {fmt!r}")
        specs.append(ImageSpec(Path(path), fmt))
    if not specs:
        raise UsageError("no image given")
    return tuple(specs)


# Errors a parser can raise on malformed input that our own checks did not catch first. The inventory turns
# them into an `ImageError` naming the image and the path: never a traceback.
MALFORMED_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ArithmeticError,
    EOFError,
    LookupError,
    RecursionError,
    ValueError,
    struct.error,
)
