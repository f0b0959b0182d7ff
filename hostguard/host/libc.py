"""The C library through ctypes, loaded once per process, for the few calls the standard library lacks
(inotify, sync_file_range, process_vm_readv, mallopt/malloc_trim). ctypes is imported on first use only."""

from __future__ import annotations

from typing import Any

_LIBC: list[Any] = []


def libc() -> Any:
    """The process's C library (errno kept for ctypes.get_errno)."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
    return _LIBC[0]
