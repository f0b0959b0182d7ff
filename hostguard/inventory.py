"""The executable-component inventory of a guest image: which files count, and their digests.

The rule (`is_executable_component`): a regular file is a component when it has any execute bit, is
setuid or setgid, carries a `security.capability` xattr, starts with the ELF magic (shared libraries are
code even without an x bit), is named like a kernel module (*.ko, *.ko.xz, *.ko.zst), or is a kernel or
initramfs image under /boot (name starting with vmlinuz, initrd or initramfs; on a filesystem named by
locator, `//LOC/...`, wherever it is, since that filesystem may be a /boot the guest mounts by other means).
Symlinks are never entries;
each hard link is an entry of its own.

`inventory(reader)` walks every filesystem once and hashes components while it walks: the fast reader's
content is streamed by a pool of threads (one per core: `os.pread` and hashlib release the GIL), a file
with several hard links is hashed once. Memory holds the file list plus a bounded number of files in
flight, whatever the image size. Any failure is an `ImageError`: a partial list is never returned.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hostguard.capabilities import capability_text
from hostguard.errors import FormatError, HostguardError, ImageError
from hostguard.imagefs import (
    MALFORMED_INPUT_ERRORS,
    FilesystemInfo,
    FsNode,
    GuestFilesystemReader,
    NodeKind,
)
from hostguard.imagefs.layout import FSTAB, Layout, plan
from hostguard.manifest import MAX_PATH_BYTES, FileEntry, encode_path

ELF_MAGIC = b"\x7fELF"
MODULE_SUFFIXES = (b".ko", b".ko.xz", b".ko.zst")
BOOT_PREFIXES = (b"vmlinuz", b"initrd", b"initramfs")


def is_executable_component(guest_path: bytes, node: FsNode) -> bool:
    """The classification rule for a regular file at `guest_path` (see the module docstring)."""
    if node.kind is not NodeKind.FILE:
        return False
    if node.mode & 0o111 or node.mode & 0o6000 or node.capability is not None:
        return True
    if node.head.startswith(ELF_MAGIC):
        return True
    name = guest_path.rsplit(b"/", 1)[-1]
    if name.endswith(MODULE_SUFFIXES):
        return True
    if not name.startswith(BOOT_PREFIXES):
        return False
    # A file the guest does not see at a normal path (`//LOCATOR/...`: an unplaced filesystem, e.g. a boot
    # partition that fstab does not name, or one hidden under a mountpoint) may still be a kernel: counted.
    return guest_path.startswith((b"/boot/", b"//"))


@dataclass(frozen=True)
class Progress:
    files_found: int  # components found so far
    files_done: int  # components hashed
    bytes_found: int
    bytes_done: int
    walking: bool  # False once every filesystem has been walked: the totals are final
    elapsed: float


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class InventoryResult:
    files: tuple[FileEntry, ...]  # sorted by path
    reader: str
    filesystems: tuple[FilesystemInfo, ...]
    layout: dict[str, str]  # locator -> mountpoint ("/" for the root); unplaced filesystems absent
    nodes: int  # directory entries walked
    hashed_files: int  # distinct contents hashed (hard links once)
    hashed_bytes: int
    seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def summary(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "filesystems": [f.locator for f in self.filesystems],
            "mounts": self.layout,
            "entries_walked": self.nodes,
            "files": len(self.files),
            "file_bytes": self.total_bytes,
            "hashed_files": self.hashed_files,
            "hashed_bytes": self.hashed_bytes,
            "seconds": round(self.seconds, 3),
        }


def inventory(
    reader: GuestFilesystemReader,
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.1,
) -> InventoryResult:
    """Walk every filesystem `reader` found and return the sorted executable components."""
    return _Run(reader, workers or os.cpu_count() or 1, progress, progress_interval).run()


class _Run:
    def __init__(
        self, reader: GuestFilesystemReader, workers: int, progress: ProgressCallback | None, interval: float
    ) -> None:
        self.reader = reader
        self.limits = reader.limits
        self.workers = workers
        self.progress = progress
        self.interval = interval
        self.start = time.monotonic()
        self.last_report = 0.0
        self.lock = threading.Lock()
        self.files_found = self.files_done = self.bytes_found = self.bytes_done = 0
        self.hashed_files = self.hashed_bytes = 0
        self.nodes = 0
        self.walking = True
        # (entry fields without digest, where the digest comes from)
        self.pending: list[tuple[FileEntry, str | Future[str]]] = []
        self.by_inode: dict[tuple[str, int], str | Future[str]] = {}
        self.slots = threading.BoundedSemaphore(max(2, workers * 4))

    # --- main flow -------------------------------------------------------------------------------------

    def run(self) -> InventoryResult:
        filesystems = self.reader.filesystems()
        layout = self._layout(filesystems)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hg-hash") if self._parallel else None
        try:
            for fs in filesystems:
                self._walk(fs, layout, pool)
            self.walking = False
            files = self._collect()
        except BaseException:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            raise
        if pool is not None:
            pool.shutdown(wait=True)
        self._report(force=True)
        mounts = {loc: (point.decode("utf-8", "surrogateescape") or "/") for loc, point in layout.mounts.items()}
        return InventoryResult(
            files=files,
            reader=self.reader.name,
            filesystems=filesystems,
            layout=mounts,
            nodes=self.nodes,
            hashed_files=self.hashed_files,
            hashed_bytes=self.hashed_bytes,
            seconds=time.monotonic() - self.start,
        )

    @property
    def _parallel(self) -> bool:
        return self.reader.parallel_content and not self.reader.remote_digest and self.workers > 1

    def _layout(self, filesystems: tuple[FilesystemInfo, ...]) -> Layout:
        fstabs: dict[str, bytes] = {}
        for fs in filesystems:
            with _malformed(fs.device, FSTAB):
                text = self.reader.read_file(fs, FSTAB, self.limits.max_small_file)
            if text is not None:
                fstabs[fs.locator] = text
        return plan(filesystems, fstabs)

    def _walk(self, fs: FilesystemInfo, layout: Layout, pool: ThreadPoolExecutor | None) -> None:
        guard = _malformed(fs.device, b"/")
        with guard:
            for node in self.reader.walk(fs):
                guard.path = node.path
                self.nodes += 1
                if node.kind is not NodeKind.FILE:
                    continue
                guest = layout.guest_path(fs.locator, node.path)
                if is_executable_component(guest, node):
                    self._add(fs, guest, node, pool)
                self._report()

    def _add(self, fs: FilesystemInfo, guest: bytes, node: FsNode, pool: ThreadPoolExecutor | None) -> None:
        limits = self.limits
        text = encode_path(guest)
        if len(text) > MAX_PATH_BYTES or len(guest) > limits.max_path_bytes:
            raise ImageError(f"{fs.device}: {text[:200]}...: path too long for a manifest")
        if len(self.pending) >= limits.max_files:
            raise ImageError(f"{fs.device}: more than {limits.max_files} executable components")
        if node.size > limits.max_file_bytes:
            raise ImageError(f"{fs.device}: {text}: {node.size} bytes exceed the {limits.max_file_bytes} byte limit")
        caps = None
        if node.capability is not None:
            try:
                caps = capability_text(node.capability)
            except FormatError as err:
                raise ImageError(f"{fs.device}: {text}: {err.message}") from None
        entry = FileEntry(text, "", node.size, node.mode, node.uid, node.gid, caps)
        self.files_found += 1
        self.bytes_found += node.size
        key = (fs.locator, node.inode) if node.inode is not None and node.nlink > 1 else None
        source: str | Future[str] | None = self.by_inode.get(key) if key is not None else None
        if source is not None:
            # Another name of a file already hashed (or being hashed): count it as done when it is.
            if isinstance(source, str):
                self._count_done(node.size, 0)
            else:
                size = node.size
                source.add_done_callback(lambda _f: self._count_done(size, 0))
        else:
            source = self._digest(fs, node, text, pool)
            if key is not None:
                self.by_inode[key] = source
        self.pending.append((entry, source))

    def _digest(
        self, fs: FilesystemInfo, node: FsNode, text: str, pool: ThreadPoolExecutor | None
    ) -> str | Future[str]:
        if node.digest is not None:
            self._count_done(node.size, node.size)
            with self.lock:
                self.hashed_files += 1
            return node.digest
        if self.reader.remote_digest:
            with _malformed(fs.device, node.path):
                digest = self.reader.digest(node)
            self._count_done(node.size, node.size)
            with self.lock:
                self.hashed_files += 1
            return digest
        if pool is None:
            return self._hash(fs, node, text)
        self.slots.acquire()
        try:
            future = pool.submit(self._hash, fs, node, text)
        except BaseException:
            self.slots.release()
            raise
        future.add_done_callback(lambda _f: self.slots.release())
        return future

    def _hash(self, fs: FilesystemInfo, node: FsNode, text: str) -> str:
        h = hashlib.sha256()
        size = 0
        with _malformed(fs.device, node.path):
            for chunk in self.reader.read_chunks(node):
                h.update(chunk)
                size += len(chunk)
                with self.lock:
                    self.bytes_done += len(chunk)
        if size != node.size:
            raise ImageError(f"{fs.device}: {text}: read {size} bytes, the inode says {node.size}")
        with self.lock:
            self.files_done += 1
            self.hashed_files += 1
            self.hashed_bytes += size
        return h.hexdigest()

    def _count_done(self, size: int, hashed: int) -> None:
        with self.lock:
            self.files_done += 1
            self.bytes_done += size
            self.hashed_bytes += hashed

    def _collect(self) -> tuple[FileEntry, ...]:
        out: list[FileEntry] = []
        for entry, source in self.pending:
            if isinstance(source, str):
                digest = source
            else:
                while True:
                    try:
                        digest = source.result(timeout=self.interval)
                        break
                    except TimeoutError:
                        self._report()
            out.append(FileEntry(entry.path, digest, entry.size, entry.mode, entry.uid, entry.gid, entry.capabilities))
            self._report()
        out.sort()
        return tuple(out)

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self.last_report < self.interval:
            return
        self.last_report = now
        with self.lock:
            snapshot = Progress(
                files_found=self.files_found,
                files_done=self.files_done,
                bytes_found=self.bytes_found,
                bytes_done=self.bytes_done,
                walking=self.walking,
                elapsed=now - self.start,
            )
        self.progress(snapshot)


class _malformed:
    """Turn a parser exception from malformed guest data into a one-line `ImageError`."""

    def __init__(self, device: str, path: bytes) -> None:
        self.device = device
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, HostguardError) or not isinstance(exc, MALFORMED_INPUT_ERRORS):
            return
        where = encode_path(self.path)[:200]
        raise ImageError(f"{self.device}: {where}: malformed filesystem data ({type(exc).__name__}: {exc})") from None
