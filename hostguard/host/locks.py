"""One post-start check (and its enforcement) per domain at a time, across threads and processes."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hostguard.host.statedir import StateDir, safe_uuid

LOCK_TIMEOUT = 300.0

_held_locks = threading.local()


@contextmanager
def domain_lock(state_dir: Path, uuid: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """One check per domain at a time, across threads and processes (the daemon's workers, `hostguard start`,
    `daemon --once`): two checks must not suspend and resume the same domain under each other. Re-entrant
    within a thread, so a caller may hold it around a whole check and the verdict's enforcement."""
    held: set[str] = getattr(_held_locks, "uuids", set())
    _held_locks.uuids = held
    if uuid in held:
        yield
        return
    directory = StateDir(state_dir).disk_locks
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{safe_uuid(uuid)}.lock"
    deadline = time.monotonic() + timeout
    fd = _lock_file(path, uuid, deadline)
    try:
        held.add(uuid)
        try:
            yield
        finally:
            held.discard(uuid)
    finally:
        os.close(fd)


def _lock_file(path: Path, uuid: str, deadline: float) -> int:
    """Open and flock the lock file; a file the sweep of a removed domain unlinked while we waited for it
    (hostguard.poststart.forget) is dropped and the one now at `path` taken, so two holders never lock two inodes."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(uuid) from None
                    time.sleep(0.05)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
