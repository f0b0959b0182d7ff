"""Streaming SHA-256 of image files, through a descriptor opened without following symlinks.

The identity recorded with each digest — (device, inode, size, mtime_ns, ctime_ns) — keys the digest cache:
ctime cannot be set from user space, so content rewritten with a forged mtime still misses the cache. The
cache is used only for files whose identity cannot be lied about (`cache_refusal`; docs/adr/0007-cache-trust.md).

This module is on the hook's start-up path: it imports nothing heavy at module level. `hashlib` (which loads
OpenSSL, ~2.5 ms) is imported only when a file is actually hashed; small inputs (envelopes, trust files,
cache keys) use `sha256_hex`, which takes the built-in SHA-256 when it is there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hostguard.errors import HostguardError, ImageError
from hostguard.record import Record

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from typing import Protocol

    from hostguard.signed.manifest import Blob

    class _Hash(Protocol):
        def update(self, data: bytes, /) -> None: ...

        def hexdigest(self) -> str: ...

    class DigestCache(Protocol):
        """What `digest_file` needs from a cache (hostguard.host.state.StateStore is one)."""

        def cached_digest(self, ident: FileIdentity) -> str | None: ...

        def store_digest(self, ident: FileIdentity, sha256: str) -> None: ...

        def hash_lock(self, ident: FileIdentity) -> AbstractContextManager[None]: ...

        @property
        def directory(self) -> Path: ...  # the state directory, where the daemon's kept digests are


# Measured on the bench host (bench/bench_verify.py, 2 GiB of random data): 1 MiB reads hash at ~1.5 GiB/s from
# the page cache, ~15% faster than `openssl dgst -sha256` and than 4-16 MiB reads (the buffer stays in the L2
# cache); mmap was ~9% faster still, but a file truncated under it kills the process with SIGBUS.
CHUNK = 1024 * 1024


class FileIdentity(Record):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _small_sha256() -> Callable[[bytes], _Hash]:
    # The interpreter's own SHA-256 (no OpenSSL load): identical digests, fine for small inputs.
    import importlib

    for name in ("_sha256", "_sha2"):  # Python 3.11, Python >= 3.12
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        ctor: Callable[[bytes], _Hash] = module.sha256
        return ctor
    from hashlib import sha256

    return sha256


def sha256_hex(*parts: bytes) -> str:
    """SHA-256 of the concatenated parts, lower-case hex. Small inputs without loading OpenSSL; large ones (an
    envelope near its limit) with it, ~5x faster: the cost of a rejected envelope is bounded (issue 22/14)."""
    if sum(len(p) for p in parts) > 1 << 20:
        import hashlib

        h: _Hash = hashlib.sha256()
    else:
        h = _small_sha256()(b"")
    for part in parts:
        h.update(part)
    return h.hexdigest()


def open_image(path: Path) -> int:
    """Open a regular file read-only without following a symlink in its last component."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symlink
            raise ImageError(f"{path} is a symlink: name the image file itself") from None
        raise ImageError(f"cannot open {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(f"{path} is not a regular file")
    return fd


def hash_fd(fd: int, chunk: int = CHUNK) -> str:
    """SHA-256 of the whole file behind `fd` (read with pread from offset 0; the fd's offset is untouched)."""
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    offset = 0
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    while True:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            break
        h.update(view[:n])
        offset += n
    return h.hexdigest()


class Digested(Record):
    path: Path
    sha256: str
    size: int
    identity: FileIdentity
    cached: bool
    kept: bool = False  # the digest is one hostguardd keeps under a read lease (`kept_digest`)

    @property
    def blob(self) -> Blob:
        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
        from hostguard.signed.manifest import Blob

        return Blob(self.sha256, self.size)


# File systems whose (device, inode, size, mtime, ctime) this kernel itself maintains. Anything else — FUSE,
# NFS, CephFS, CIFS, 9p, virtiofs, overlay — reports what a server or daemon says, so it is hashed every time.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs"})
_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x10


def filesystem_type(fd: int) -> str:
    """The type of the file system the open file `fd` is on ("?" when it cannot be told).

    By the mount the descriptor itself holds (`mnt_id` in /proc/self/fdinfo, which pins it), looked up in a
    fresh /proc/self/mountinfo: a daemon runs for months, and device numbers and mount IDs are reused after
    an unmount, so nothing is remembered between calls (two small /proc reads, ~15 us here).
    """
    try:
        info = _read_proc(f"/proc/self/fdinfo/{fd}")
        mnt_id = info[info.index(b"mnt_id:") + 7 :].split(None, 1)[0]
        for line in _read_proc("/proc/self/mountinfo").splitlines():
            fields = line.split(b" ")
            if fields[0] == mnt_id:
                return fields[fields.index(b"-") + 1].decode("utf-8", "replace")
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def _read_proc(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_immutable(fd: int) -> bool:
    import fcntl

    try:
        flags = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))
    except OSError:
        return False
    return bool(int.from_bytes(flags[:4], "little") & _FS_IMMUTABLE_FL)


def _has_no_writer(fd: int) -> bool:
    """True when no process holds the file open for writing (a writable shared mmap included), now.

    A read lease is granted only then (fcntl(2)); it is released at once. EACCES (not our file and no
    CAP_LEASE), EINVAL (a file system without leases) and EAGAIN (a writer) all mean "cannot tell": False.
    A writer opening the file within the microseconds the lease is held makes the kernel signal us; by
    default that is SIGIO, which ends the process (measured), so it is made SIGURG, ignored by default.
    """
    import _signal  # type: ignore[import-not-found]  # `signal` wraps it in enums: ~0.6 ms
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def cache_refusal(fd: int, path: Path) -> str | None:
    """Why a cached digest of this file could be a lie (None: it cannot), issues 14/3 and 22/7.

    The cache key assumes the content cannot change while (dev, ino, size, mtime, ctime) stay. That holds only
    when this kernel keeps those fields (a local file system) and no one but root can change the bytes from
    now on: no writer exists now (a store through a shared writable mmap into a dirty page changes the file
    and leaves mtime and ctime alone, measured in tests/unit/test_verify_cache_attacks.py), and none can appear —
    the file is immutable, or owned by root, not writable by group or others, in a directory likewise. Checked
    before hashing: a writer that left during the hash could have changed bytes already read.
    """
    st = os.fstat(fd)
    if not ((_root_only(st) and _parent_root_only(path)) or is_immutable(fd)):
        return "writable by a user other than root"
    fstype = filesystem_type(fd)
    if fstype not in LOCAL_FILESYSTEMS:
        return f"on a {fstype} file system"  # whose owner, mode and flags are what a server says, too
    if not _has_no_writer(fd):
        return "open for writing (or not provably not)"
    return None


def _parent_root_only(path: Path) -> bool:
    try:
        st = os.stat(path.parent)
    except OSError:
        return False
    sticky_root = st.st_uid == 0 and st.st_mode & stat.S_ISVTX
    return st.st_uid == 0 and (not st.st_mode & 0o022 or bool(sticky_root))


# --- digests hostguardd keeps under a read lease (docs/adr/0021-kept-digests.md) ------------------------------
# The daemon (hostguard.poststart.digestkeeper) holds a read lease (F_SETLEASE F_RDLCK) on each file it hashed,
# from before the first byte was read for as long as its row exists. The kernel grants such a lease only while
# nothing has the file open for writing (a shared writable mapping included) and breaks it at the first open for
# writing or truncate; a broken lease never becomes active again. So while the daemon's lease on the inode is
# ACTIVE, the bytes are those it hashed, whatever utime, chown or chmod did to the times. The hook does not take
# the daemon's word for it: it reads the lease's state from /proc itself.
KEPT_DIR = "kept"
KEPT_FORMAT = "hostguard-kept-1"


def kept_row_name(dev: int, ino: int) -> str:
    return f"{dev}-{ino}"


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, names one process for this boot."""
    stat_line = _read_proc(f"/proc/{pid}/stat")
    return stat_line[stat_line.rindex(b")") + 2 :].split()[19].decode("ascii")


def _read_kept_row(directory: str, name: str) -> bytes | None:
    """The row file, if root (or we) alone could have written it; None otherwise or when there is none."""
    try:
        fd = os.open(f"{directory}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def kept_digest(state_dir: Path, fd: int, ident: FileIdentity) -> str | None:
    """The digest hostguardd keeps for the file open at `fd`, when it is provably still the file's content.

    Trusted only when all of these hold: the row (state/kept/DEV-INO, written by root) names this size; the
    process it names is that process (pid and start time) and runs as root; its descriptor is this very inode,
    open read-only, and /proc shows that descriptor's lease as "LEASE ACTIVE READ" (a lease being broken shows
    "BREAKING UNLCK", a released one nothing); and the row is byte for byte the same after those checks. The
    daemon removes a row before it releases its lease and writes one only after hashing under a lease taken
    before hashing, so a row that existed throughout the checks belongs to the lease seen active: no open for
    writing happened since the hash. On a file system this kernel does not keep itself nothing is trusted.
    """
    directory = f"{state_dir}/{KEPT_DIR}"
    try:
        st = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        return None
    name = kept_row_name(ident.dev, ident.ino)
    row = _read_kept_row(directory, name)
    if row is None:
        return None
    try:
        fmt, sha, size, _gen, pid_text, started, fd_text = row.decode("ascii").split()
        pid, holder_fd = int(pid_text), int(fd_text)
        if fmt != KEPT_FORMAT or int(size) != ident.size or len(sha) != 64:
            return None
        if os.stat(f"/proc/{pid}").st_uid != 0 or process_start_time(pid) != started:
            return None
        held = os.stat(f"/proc/{pid}/fd/{holder_fd}")
        if (held.st_dev, held.st_ino) != (ident.dev, ident.ino):
            return None
        info = _read_proc(f"/proc/{pid}/fdinfo/{holder_fd}")
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if not _lease_active(info, pid) or filesystem_type(fd) not in LOCAL_FILESYSTEMS:
        return None
    if _read_kept_row(directory, name) != row:
        return None  # replaced or removed meanwhile: the lease seen may be a newer one
    return sha


def _lease_active(fdinfo: bytes, pid: int) -> bool:
    """fdinfo of a read-only descriptor that holds an unbroken read lease taken by `pid`."""
    flags = lease = None
    for line in fdinfo.splitlines():
        if line.startswith(b"flags:"):
            flags = int(line.split()[1], 8)
        elif line.startswith(b"lock:"):
            # "lock:\t1: LEASE  ACTIVE    READ 1234 fe:00:5678 0 EOF"
            fields = line.split()
            if fields[2:6] == [b"LEASE", b"ACTIVE", b"READ", str(pid).encode()]:
                lease = True
    return flags is not None and flags & os.O_ACCMODE == os.O_RDONLY and lease is True


def digest_fd(fd: int, path: Path, cache: DigestCache | None = None) -> Digested:
    before = FileIdentity.from_stat(os.fstat(fd))
    if cache is not None:
        kept = kept_digest(cache.directory, fd, before)
        if kept is not None:
            return Digested(path, kept, before.size, before, cached=True, kept=True)
    if cache is None or cache_refusal(fd, path) is not None:
        return _hash_and_store(fd, path, before, None)
    hit = cache.cached_digest(before)
    if hit is not None:
        return Digested(path, hit, before.size, before, cached=True)
    with cache.hash_lock(before):  # another process may be hashing this very file: wait for its digest
        hit = cache.cached_digest(before)
        if hit is not None:
            return Digested(path, hit, before.size, before, cached=True)
        return _hash_and_store(fd, path, before, cache)


def _hash_and_store(fd: int, path: Path, before: FileIdentity, cache: DigestCache | None) -> Digested:
    sha = hash_fd(fd)
    after = FileIdentity.from_stat(os.fstat(fd))
    if after != before:
        raise ImageError(f"{path} changed while it was being hashed")
    if cache is not None:
        try:
            cache.store_digest(after, sha)
        except HostguardError as exc:
            # A cache that cannot be written costs speed, never correctness.
            import logging

            logging.getLogger(__name__).warning("digest cache not updated for %s: %s", path, exc)
    return Digested(path, sha, after.size, after, cached=False)


# The child of `DigestProcess`: hashes the descriptor it inherits, as `hash_fd` does, and prints the hex digest.
_CHILD = """import hashlib, os, sys
fd, chunk = int(sys.argv[1]), int(sys.argv[2])
h = hashlib.sha256(); view = memoryview(bytearray(chunk)); offset = 0
while n := os.preadv(fd, [view], offset):
    h.update(view[:n]); offset += n
print(h.hexdigest())
"""


class DigestProcess:
    """The digest of one image file, computed by a child interpreter while this process does other work.

    Why a process and not a thread: a thread hashing beside other Python threads (an inventory's walk and
    its hashing pool) waits for the GIL after every chunk, and they for it; a child hashes at full speed on
    its own core. The file is opened here (no symlink, regular file) and the child only inherits the
    descriptor; the identity is compared before and after, as in `digest_fd`.
    """

    def __init__(self, path: Path) -> None:
        import subprocess
        import sys

        self.path = path
        self.fd = open_image(path)
        try:
            self.before = FileIdentity.from_stat(os.fstat(self.fd))
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD, str(self.fd), str(CHUNK)],
                pass_fds=(self.fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            os.close(self.fd)
            raise ImageError(f"cannot start hashing {path}: {exc.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise

    def result(self) -> Digested:
        """Wait for the digest. ImageError if the child failed or the file changed meanwhile."""
        try:
            out, err = self.proc.communicate()
            after = FileIdentity.from_stat(os.fstat(self.fd))
        finally:
            self.close()
        digest = out.decode("ascii", "replace").strip()
        if self.proc.returncode != 0 or len(digest) != 64:
            lines = err.decode("utf-8", "replace").strip().splitlines() or [f"exit status {self.proc.returncode}"]
            raise ImageError(f"cannot hash {self.path}: {lines[-1]}")
        if after != self.before:
            raise ImageError(f"{self.path} changed while it was being hashed")
        return Digested(self.path, digest, after.size, after, cached=False)

    def close(self) -> None:
        """Stop the child if it still runs and release the descriptor (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def digest_file(path: Path, cache: DigestCache | None = None) -> Digested:
    fd = open_image(path)
    try:
        return digest_fd(fd, path, cache)
    finally:
        os.close(fd)
