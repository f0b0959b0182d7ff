"""Small file-system helpers shared by commands and adapters."""

from __future__ import annotations

import os
from _thread import get_ident  # `threading` itself costs the hook an import
from pathlib import Path

from hostguard.errors import HostguardError, UsageError


def atomic_write(
    path: Path,
    data: bytes,
    mode: int = 0o644,
    *,
    durable: bool = True,
    error: type[HostguardError] = UsageError,
) -> None:
    """Write a file so readers see the old or the new content, never a part: a fresh temp file beside it (never
    through a symlink), then rename. `durable` also fsyncs the file and the directory (skip it only for files
    that matter while the host is up); failures raise `error` with one line."""
    # per process and thread: two writers of one file never share a temp file (the daemon sweeps dead PIDs' ones)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{get_ident()}")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask must not narrow it (a 0755 program, a 0444 envelope)
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {exc.strerror}") from None


def read_input(path: str, what: str, limit: int = 1 << 30) -> bytes:
    """Read an operator-supplied file, turning OS errors into one-line usage errors."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes")
    return data


FULL_BELOW = 64 * 1024  # bytes free under which a write error is taken for a full file system


def full_filesystem(path: Path) -> str | None:
    """ "the file system holding it (MOUNT) is full (N bytes free)" when it is (no space or no inodes), else None:
    errors that say "full" (sqlite's among them) are named a full disk only when the file system agrees."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= FULL_BELOW and st.f_favail != 0:
        return None
    mount = Path(os.path.realpath(path))
    try:
        dev = mount.stat().st_dev
        while mount.parent != mount and mount.parent.stat().st_dev == dev:
            mount = mount.parent
    except OSError:
        pass
    return f"the file system holding it ({mount}) is full ({free} bytes free)"
