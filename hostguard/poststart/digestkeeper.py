"""hostguardd's digest keeper: image digests that survive `touch`, trusted only while no one opened the file for
writing since it was hashed (issue 15 item 3 under issue 14 item 3; docs/adr/0021-kept-digests.md).

For every regular file in the watched image directories (Nova's `_base`, the image library, the envelope index
directories, `[daemon] image_dirs`) the keeper opens the file read-only, takes a read lease on it
(F_SETLEASE F_RDLCK: granted only while no descriptor or shared mapping has it open for writing), hashes it
through that descriptor and writes a row state/kept/DEV-INO naming the digest, this process and the
descriptor. The lease stays. The first open for writing (or truncate) anywhere on the host makes the kernel mark
the lease "breaking" and signal this process; the keeper then removes the row and releases the lease at once, so
the writer waits milliseconds, not the kernel's lease-break-time. A broken lease never becomes active again: a
file written meanwhile is kept again only by a new lease and a new hash.

The hook (hostguard.host.digest.kept_digest) trusts a row only while it sees this process's lease on that
inode active in /proc; utime, chown and chmod (Nova touches its bases at every spawn, libvirt relabels) leave
the lease alone, so the start finds the digest without hashing.

Signals: the kernel signals the lease's owner; each descriptor's owner is set to the keeper's signal thread
(F_SETOWN_EX, F_OWNER_TID), which blocks SIGURG and waits for it; SIGURG is ignored by default, so a stray
delivery to another thread is harmless, and the signal thread also looks at every lease once a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import secrets
import select
import signal
import stat
import struct
import threading
import time
from pathlib import Path

from hostguard.errors import HostguardError
from hostguard.host.config import Config
from hostguard.host.digest import (
    KEPT_DIR,
    KEPT_FORMAT,
    LOCAL_FILESYSTEMS,
    filesystem_type,
    hash_fd,
    kept_row_name,
    process_start_time,
)
from hostguard.host.fsutil import atomic_write
from hostguard.host.libc import libc

log = logging.getLogger("hostguard.poststart.digestkeeper")

LEASE_SIGNAL = signal.SIGURG
F_SETOWN_EX, F_OWNER_TID = 15, 0
MAX_KEPT = 512  # descriptors held at most (one per kept file)
RESCAN_SECONDS = 30.0  # every watched directory is listed again this often (inotify makes it sooner)
SWEEP_SECONDS = 1.0  # every lease is looked at this often even without a signal
SETTLE_SECONDS = 0.2  # after an inotify event, wait this long for more before listing the directory
NOVA_BASE = Path("/var/lib/nova/instances/_base")
SKIPPED_SUFFIXES = (".hgsig", ".part", ".tmp")

# inotify(7): what changes a directory's list of files or a file's content
IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x8, 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_ONLYDIR, IN_NONBLOCK, IN_CLOEXEC = 0x400, 0x800, 0x01000000, 0o4000, 0o2000000
WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF


def watched_dirs(config: Config) -> tuple[Path, ...]:
    """`[daemon] image_dirs` when set; else the image library, the envelope index directories and, under
    `[policy] profile = "nova"`, Nova's image cache."""
    if config.image_dirs is not None:
        return config.image_dirs
    dirs = [config.library_dir, *config.envelope_index_dirs]
    if config.profile == "nova":
        dirs.append(NOVA_BASE)
    return tuple(dirs)


class Kept:
    """One kept file: its descriptor (which holds the lease), and its row once the hash is done."""

    def __init__(self, path: Path, fd: int, dev: int, ino: int) -> None:
        self.path, self.fd, self.dev, self.ino = path, fd, dev, ino
        self.broken = False  # the lease was broken or released: never trusted again
        self.row = False  # the row file exists
        self.hashing = True  # `keep` still reads the descriptor


class DigestKeeper:
    def __init__(self, state_dir: Path, dirs: tuple[Path, ...]) -> None:
        self.dirs = dirs
        self.rows = state_dir / KEPT_DIR
        self.entries: dict[tuple[int, int], Kept] = {}
        self.lock = threading.Lock()  # entries, and each entry's row and lease
        self.stop = threading.Event()
        self.signal_tid = 0
        self.signal_ready = threading.Event()
        self.pid = os.getpid()
        self.started = process_start_time(self.pid)
        self.counter = 0
        self.salt = secrets.token_hex(4)
        self.threads: list[threading.Thread] = []
        self._inotify: int | None = None
        self._wake: tuple[int, int] | None = None  # a pipe close() writes to: the scan thread's select returns
        self._signal_lock = threading.Lock()
        self._signal_thread: int | None = None  # the lease thread's ident while it is in its loop

    # --- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.rows.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.rows, 0o700)
        for stale in self.rows.iterdir():  # rows of an earlier daemon: their leases died with it
            stale.unlink(missing_ok=True)
        self._wake = os.pipe()
        for target, name in ((self._signal_loop, "keeper-leases"), (self._scan_loop, "keeper-scan")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        self.signal_ready.wait(5)

    def close(self) -> None:
        """Remove every row, then release every lease (in that order: a row never outlives its lease)."""
        self.stop.set()
        self._wake_threads()
        for thread in self.threads:
            thread.join(5)
        with self.lock:
            for key in list(self.entries):
                self._drop(key)
        if self._inotify is not None:
            os.close(self._inotify)
            self._inotify = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _wake_threads(self) -> None:
        """Cut the threads' waits short once `stop` is set (else each ends at its next timeout, within a
        second): the lease thread's by its own signal (held pending if it is sweeping, dropped when it ends),
        the scan thread's through the wake pipe."""
        with self._signal_lock:  # a thread still in its loop is alive: it clears the ident under this lock
            if self._signal_thread is not None:
                signal.pthread_kill(self._signal_thread, LEASE_SIGNAL)
        if self._wake is not None:
            os.write(self._wake[1], b"\0")

    # --- leases -------------------------------------------------------------------------------------------

    def _signal_loop(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})
        self.signal_tid = threading.get_native_id()
        with self._signal_lock:
            self._signal_thread = threading.get_ident()
        self.signal_ready.set()
        try:
            while not self.stop.is_set():
                signal.sigtimedwait({LEASE_SIGNAL}, SWEEP_SECONDS)
                self.release_broken()
        finally:
            with self._signal_lock:
                self._signal_thread = None

    def release_broken(self) -> list[Path]:
        """Every lease the kernel is breaking (or broke): its row removed, then the lease released."""
        released = []
        with self.lock:
            for key, entry in list(self.entries.items()):
                if _lease(entry.fd) != fcntl.F_RDLCK:
                    released.append(entry.path)
                    self._drop(key)
        for path in released:
            log.info("kept digest of %s dropped: opened for writing", path)
        return released

    def _drop(self, key: tuple[int, int]) -> None:
        """Under self.lock: the row first, then the lease; the descriptor is closed unless a hash still reads it
        (`keep` closes it then: a number reused meanwhile must never be read as this file)."""
        entry = self.entries.pop(key)
        entry.broken = True
        if entry.row:
            (self.rows / kept_row_name(entry.dev, entry.ino)).unlink(missing_ok=True)
            entry.row = False
        with contextlib.suppress(OSError):  # already gone when the kernel's lease-break-time ran out
            fcntl.fcntl(entry.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        if not entry.hashing:
            os.close(entry.fd)

    def keep(self, path: Path) -> bool:
        """Lease, hash and record one file; False when it cannot be kept now (a writer, not local, full)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with self.lock:
                if not stat.S_ISREG(st.st_mode) or key in self.entries or len(self.entries) >= MAX_KEPT:
                    os.close(fd)
                    return False
                if filesystem_type(fd) not in LOCAL_FILESYSTEMS or not self._lease(fd):
                    os.close(fd)
                    return False
                entry = Kept(path, fd, st.st_dev, st.st_ino)
                self.entries[key] = entry
        except OSError:
            os.close(fd)
            return False
        try:
            sha: str | None = hash_fd(fd)  # under the lease, outside the lock: a writer is let through at once
        except OSError as exc:
            log.warning("cannot keep the digest of %s: %s", path, exc.strerror)
            sha = None
        with self.lock:
            entry.hashing = False
            if entry.broken:
                os.close(fd)  # dropped while we read: the lease is released already
                return False
            if sha is None or _lease(fd) != fcntl.F_RDLCK or os.fstat(fd).st_size != st.st_size:
                self._drop(key)
                return False
            try:
                self._write_row(entry, sha, st.st_size)
            except HostguardError as exc:
                log.warning("cannot keep the digest of %s: %s", path, exc)
                self._drop(key)
                return False
        log.info("keeping the digest of %s", path)
        return True

    def _lease(self, fd: int) -> bool:
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)  # reset by every release: set before each lease
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            return False  # EAGAIN: open for writing now; EINVAL/EACCES: no leases here
        if self.signal_tid:
            fcntl.fcntl(fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, self.signal_tid))
        return True

    def _write_row(self, entry: Kept, sha: str, size: int) -> None:
        self.counter += 1
        gen = f"{self.salt}.{self.counter}"
        line = f"{KEPT_FORMAT} {sha} {size} {gen} {self.pid} {self.started} {entry.fd}\n"
        # Not durable: a row means something only while this process holds its lease (gone at a reboot).
        atomic_write(self.rows / kept_row_name(entry.dev, entry.ino), line.encode(), mode=0o600, durable=False)
        entry.row = True

    # --- watching the image directories -----------------------------------------------------------------------

    def _scan_loop(self) -> None:
        self._inotify = _inotify_init()
        last_full = 0.0
        while not self.stop.is_set():
            if self._inotify is not None:
                for directory in self.dirs:
                    _inotify_watch(self._inotify, directory)
            try:
                self.scan()
            except Exception:  # the keeper must not stop: the hook then simply hashes (logged with traceback)
                log.exception("scanning the image directories failed")
            last_full = time.monotonic()
            while not self.stop.is_set() and time.monotonic() - last_full < RESCAN_SECONDS:
                if self._wait_for_events(1.0):
                    self.stop.wait(SETTLE_SECONDS)
                    self._wait_for_events(0)
                    break

    def _wait_for_events(self, timeout: float) -> bool:
        if self._inotify is None:
            self.stop.wait(timeout)
            return False
        wake = [self._wake[0]] if self._wake is not None else []
        ready, _, _ = select.select([self._inotify, *wake], [], [], timeout)
        if self._inotify not in ready:  # the timeout, or close()
            return False
        try:
            while os.read(self._inotify, 65536):
                pass
        except BlockingIOError:
            pass
        return True

    def scan(self) -> int:
        """Forget files that are gone or replaced, keep the new ones; returns how many were newly kept."""
        present: set[tuple[int, int]] = set()
        candidates: list[Path] = []
        for directory in self.dirs:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
                    continue
                path = directory / name
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 0:
                    present.add((st.st_dev, st.st_ino))
                    candidates.append(path)
        with self.lock:
            for key in [k for k in self.entries if k not in present]:
                self._drop(key)  # removed or renamed away: do not pin its blocks (Nova's cache manager deletes)
        kept = 0
        for path in candidates:
            if self.stop.is_set():
                break
            kept += self.keep(path)
        return kept


def _lease(fd: int) -> int:
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETLEASE))
    except OSError:
        return fcntl.F_UNLCK


def _inotify_init() -> int | None:
    fd = int(libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    if fd < 0:
        why = os.strerror(ctypes.get_errno())
        log.warning("inotify unavailable (%s): image directories are listed every %ss", why, RESCAN_SECONDS)
        return None
    return fd


def _inotify_watch(fd: int, directory: Path) -> None:
    # Adding a watch that exists only refreshes it; a directory made later is picked up at the next pass.
    libc().inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK | IN_ONLYDIR)


def start_keeper(config: Config) -> DigestKeeper | None:
    """The daemon's keeper, started; None when it watches nothing or cannot run (the hook then hashes)."""
    dirs = watched_dirs(config)
    if not dirs:
        return None
    try:
        keeper = DigestKeeper(config.state_dir, dirs)
        keeper.start()
    except OSError as exc:
        log.warning("digest keeper not started: %s", exc)
        return None
    log.info("keeping digests of the images in %s", ", ".join(map(str, dirs)))
    return keeper
