"""Streaming SHA-256 of image files, through a descriptor opened without following symlinks.

The identity recorded with each digest — (device, inode, size, mtime_ns, ctime_ns) — keys the digest cache:
ctime cannot be set from user space, so content rewritten with a forged mtime still misses the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hostguard.errors import HostguardError, ImageError
from hostguard.manifest import Blob

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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


def hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
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


class DigestCache(Protocol):
    """What `digest_file` needs from a cache (hostguard.state.StateStore is one)."""

    def cached_digest(self, ident: FileIdentity) -> str | None: ...

    def store_digest(self, ident: FileIdentity, sha256: str) -> None: ...


@dataclass(frozen=True)
class Digested:
    path: Path
    blob: Blob
    identity: FileIdentity
    cached: bool


def digest_fd(fd: int, path: Path, cache: DigestCache | None = None) -> Digested:
    before = FileIdentity.from_stat(os.fstat(fd))
    if cache is not None:
        hit = cache.cached_digest(before)
        if hit is not None:
            return Digested(path, Blob(hit, before.size), before, cached=True)
    sha = hash_fd(fd)
    after = FileIdentity.from_stat(os.fstat(fd))
    if after != before:
        raise ImageError(f"{path} changed while it was being hashed")
    if cache is not None:
        try:
            cache.store_digest(after, sha)
        except HostguardError as exc:
            # A cache that cannot be written costs speed, never correctness.
            log.warning("digest cache not updated for %s: %s", path, exc)
    return Digested(path, Blob(sha, after.size), after, cached=False)


def digest_file(path: Path, cache: DigestCache | None = None) -> Digested:
    fd = open_image(path)
    try:
        return digest_fd(fd, path, cache)
    finally:
        os.close(fd)
