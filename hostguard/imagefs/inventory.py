"""The executable-component inventory of a guest image: which files count, and their digests.

The rule (`is_executable_component`): a regular file is a component when it has any execute bit, is
setuid or setgid, carries a `security.capability` xattr, starts with the ELF magic (shared libraries are
code even without an x bit), is named like a kernel module (*.ko, *.ko.xz, *.ko.zst), or is a kernel or
initramfs image under /boot (name starting with vmlinuz, initrd or initramfs; on a filesystem named by
locator, `//LOC/...`, wherever it is, since that filesystem may be a /boot the guest mounts by other means).
Symlinks are never entries;
each hard link is an entry of its own.

`inventory(reader)` walks every filesystem once, then hashes the components, biggest first, in one thread
per core (`os.pread` and hashlib release the GIL); a file with several hard links is hashed once. Where the
reader can (`content_plan`), each file's reads are worked out before hashing, so a hashing thread runs a
flat pread/update loop: every bytecode it runs holds the GIL the other threads are waiting for. Memory
holds the file list and a bounded number of read plans, whatever the image size. Any failure is an
`ImageError`: a partial list is never returned.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from hostguard.errors import FormatError, HostguardError, ImageError
from hostguard.imagefs import (
    MALFORMED_INPUT_ERRORS,
    FilesystemInfo,
    FsNode,
    GuestFilesystemReader,
    Limits,
    NodeKind,
)
from hostguard.imagefs.capabilities import capability_text
from hostguard.imagefs.disk import ContentPlan
from hostguard.imagefs.layout import FSTAB, Layout, plan
from hostguard.record import Record
from hostguard.signed.manifest import MAX_PATH_BYTES, FileEntry, encode_path

ELF_MAGIC = b"\x7fELF"
MODULE_SUFFIXES = (b".ko", b".ko.xz", b".ko.zst")
BOOT_PREFIXES = (b"vmlinuz", b"initrd", b"initramfs")
PLAN_SEGMENTS = 1 << 18  # read-plan segments held at once (~30 MiB at worst); the rest streams unplanned
PLAN_SEGMENTS_PER_FILE = 4096


def manifest_path(raw: bytes) -> str:
    """`encode_path(raw)`, with a fast path for the common case (valid UTF-8 without "%": the text itself)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return encode_path(raw)
    return encode_path(raw) if "%" in text else text


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


def component_facts(fs: FilesystemInfo, guest: bytes, node: FsNode, limits: Limits) -> tuple[str, str | None]:
    """The manifest path and capability text of a component, after the per-file limits. ImageError."""
    text = manifest_path(guest)
    if len(text) > MAX_PATH_BYTES or len(guest) > limits.max_path_bytes:
        raise ImageError(f"{fs.device}: {text[:200]}...: path too long for a manifest")
    if node.size > limits.max_file_bytes:
        raise ImageError(f"{fs.device}: {text}: {node.size} bytes exceed the {limits.max_file_bytes} byte limit")
    caps = None
    if node.capability is not None:
        try:
            caps = capability_text(node.capability)
        except FormatError as err:
            raise ImageError(f"{fs.device}: {text}: {err.message}") from None
    return text, caps


class Progress(Record):
    files_found: int  # entries found so far
    files_done: int  # entries whose digest is known
    bytes_found: int  # bytes of distinct contents to hash (hard links count once)
    bytes_done: int
    walking: bool  # False once every filesystem has been walked: the totals are final
    elapsed: float


ProgressCallback = Callable[[Progress], None]


class InventoryResult(Record):
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
    yield_to_others: bool = False,
) -> InventoryResult:
    """Walk every filesystem `reader` found and return the sorted executable components. `yield_to_others`:
    the hashing threads run at a lower priority than the rest of this process and its children (use it
    when the caller hashes something else meanwhile that would otherwise finish last)."""
    return _Run(reader, workers or os.cpu_count() or 1, progress, progress_interval, yield_to_others).run()


class _Run:
    """One inventory: walk everything first (metadata only, main thread), then hash the distinct contents.

        Walking and hashing are not overlapped on purpose: the walk is Python work that holds the GIL, and a
        hashing thread returning from `pread`/`update` would wait for it (up to the 5 ms switch interval) after
        every chunk; measured on 2 cores, walk-then-hash is ~15% faster. It also makes the totals (and the ETA)
        known before hashing starts. Memory: the candidate list, i.e. the size of the file list, and read plans
    up to PLAN_SEGMENTS.
    """

    def __init__(
        self,
        reader: GuestFilesystemReader,
        workers: int,
        progress: ProgressCallback | None,
        interval: float,
        yield_to_others: bool = False,
    ) -> None:
        self.reader = reader
        self.limits = reader.limits
        self.workers = workers
        self.yield_to_others = yield_to_others
        self.progress = progress
        self.interval = interval
        self.start = time.monotonic()
        self.last_report = 0.0
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.files_found = self.files_done = self.bytes_found = self.bytes_done = 0
        self.hashed_files = self.hashed_bytes = 0
        self.nodes = 0
        self.walking = True
        # Entries: (manifest path, node, capability text, index of its content); contents: what to hash.
        self.items: list[tuple[str, FsNode, str | None, int]] = []
        self.contents: list[tuple[FilesystemInfo, FsNode, str]] = []
        self.refs: list[int] = []  # entries per content (hard links share one)
        self.by_inode: dict[tuple[str, int], int] = {}
        self.in_flight: list[int] = []  # bytes hashed of the files being hashed, one slot per hashing thread
        self.error: BaseException | None = None  # the first failure of a hashing thread

    def run(self) -> InventoryResult:
        filesystems = self.reader.filesystems()
        layout = self._layout(filesystems)
        for fs in filesystems:
            self._walk(fs, layout)
        self.walking = False
        self._report(force=True)
        digests = self._hash_all()
        files = sorted(
            FileEntry(text, digests[index], node.size, node.mode, node.uid, node.gid, caps)
            for text, node, caps, index in self.items
        )
        self._report(force=True)
        mounts = {loc: (point.decode("utf-8", "surrogateescape") or "/") for loc, point in layout.mounts.items()}
        return InventoryResult(
            files=tuple(files),
            reader=self.reader.name,
            filesystems=filesystems,
            layout=mounts,
            nodes=self.nodes,
            hashed_files=self.hashed_files,
            hashed_bytes=self.hashed_bytes,
            seconds=time.monotonic() - self.start,
        )

    def _layout(self, filesystems: tuple[FilesystemInfo, ...]) -> Layout:
        fstabs: dict[str, bytes] = {}
        for fs in filesystems:
            with _malformed(fs.device, FSTAB):
                text = self.reader.read_file(fs, FSTAB, self.limits.max_small_file)
            if text is not None:
                fstabs[fs.locator] = text
        return plan(filesystems, fstabs)

    # --- walking ---------------------------------------------------------------------------------------

    def _walk(self, fs: FilesystemInfo, layout: Layout) -> None:
        guard = _malformed(fs.device, b"/")
        with guard:
            for node in self.reader.walk(fs):
                guard.path = node.path
                self.nodes += 1
                if node.kind is not NodeKind.FILE:
                    continue
                guest = layout.guest_path(fs.locator, node.path)
                if is_executable_component(guest, node):
                    self._add(fs, guest, node)
                    self._report()

    def _add(self, fs: FilesystemInfo, guest: bytes, node: FsNode) -> None:
        limits = self.limits
        if len(self.items) >= limits.max_files:
            raise ImageError(f"{fs.device}: more than {limits.max_files} executable components")
        text, caps = component_facts(fs, guest, node, limits)
        key = (fs.locator, node.inode) if node.inode is not None and node.nlink > 1 else None
        index = self.by_inode.get(key) if key is not None else None
        if index is None:
            index = len(self.contents)
            self.contents.append((fs, node, text))
            self.refs.append(0)
            self.bytes_found += node.size
            if key is not None:
                self.by_inode[key] = index
        self.refs[index] += 1
        self.files_found += 1
        self.items.append((text, node, caps, index))

    # --- hashing ---------------------------------------------------------------------------------------

    def _hash_all(self) -> list[str]:
        digests: list[str] = [""] * len(self.contents)
        streamed: list[int] = []
        for index, (fs, node, _text) in enumerate(self.contents):
            if node.digest is not None:
                digests[index] = node.digest
            elif self.reader.remote_digest:
                with _malformed(fs.device, node.path):
                    digests[index] = self.reader.digest(node)
            else:
                streamed.append(index)
                continue
            self._done(index, node.size)
            self._report()
        # Biggest first, so the threads finish together; each file's reads are planned here, in one thread,
        # so the hashing threads run a flat pread/update loop and rarely need the GIL.
        streamed.sort(key=lambda i: -self.contents[i][1].size)
        plans = self._plans(streamed)
        workers = min(self.workers, len(streamed)) if self.reader.parallel_content else 1
        self.in_flight = [0] * max(workers, 1)
        queue = iter(streamed)
        if workers <= 1:
            self._worker(0, queue, plans, digests)
        else:
            threads = [
                threading.Thread(target=self._worker, args=(slot, queue, plans, digests), name=f"hg-hash-{slot}")
                for slot in range(workers)
            ]
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    while thread.is_alive():
                        thread.join(self.interval)
                        self._report()
            except BaseException:
                self.cancel.set()
                for thread in threads:
                    thread.join()
                raise
        if self.error is not None:
            raise self.error
        return digests

    def _plans(self, streamed: list[int]) -> dict[int, ContentPlan]:
        """Read plans for the streamed contents, up to PLAN_SEGMENTS segments in all (memory stays bounded
        on a hostile, maximally fragmented image): the rest is read through `read_chunks`."""
        plans: dict[int, ContentPlan] = {}
        budget = PLAN_SEGMENTS
        for index in streamed:
            fs, node, _text = self.contents[index]
            with _malformed(fs.device, node.path):
                plan = self.reader.content_plan(node, min(budget, PLAN_SEGMENTS_PER_FILE))
            if plan is not None:
                plans[index] = plan
                budget -= len(plan.segments)
                if budget <= 0:
                    break
        return plans

    def _worker(self, slot: int, queue: Iterator[int], plans: dict[int, ContentPlan], digests: list[str]) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        if self.yield_to_others and not in_main:
            _lower_thread_priority()
        while not self.cancel.is_set():
            with self.lock:
                index = next(queue, None)
            if index is None:
                return
            try:
                digests[index] = self._hash(index, plans.get(index), slot)
                if in_main:  # no thread of its own to report progress meanwhile
                    self._report()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
                with self.lock:
                    if self.error is None:
                        self.error = err
                self.cancel.set()
                return

    def _hash(self, index: int, plan: ContentPlan | None, slot: int) -> str:
        fs, node, text = self.contents[index]
        h = hashlib.sha256()
        size = 0
        in_flight = self.in_flight
        cancelled = self.cancel.is_set
        with _malformed(fs.device, node.path):
            for chunk in plan.chunks() if plan is not None else self.reader.read_chunks(node):
                if cancelled():
                    raise ImageError(f"{fs.device}: {text}: cancelled")
                h.update(chunk)
                n = len(chunk)
                size += n
                in_flight[slot] += n  # one slot per thread: no lock needed
        in_flight[slot] -= size
        if size != node.size:
            raise ImageError(f"{fs.device}: {text}: read {size} bytes, the inode says {node.size}")
        self._done(index, size)
        return h.hexdigest()

    def _done(self, index: int, size: int) -> None:
        with self.lock:
            self.files_done += self.refs[index]
            self.bytes_done += size
            self.hashed_files += 1
            self.hashed_bytes += size

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
                bytes_done=self.bytes_done + sum(self.in_flight),
                walking=self.walking,
                elapsed=now - self.start,
            )
        self.progress(snapshot)


def _lower_thread_priority() -> None:
    """Nice this thread (only: Linux applies PRIO_PROCESS with a thread id to that thread) by 5 steps, so
    work the caller runs beside the inventory, e.g. a disk digest child, keeps its core. A hint: a failure
    costs nothing but speed."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 5))
    except OSError:
        pass


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
