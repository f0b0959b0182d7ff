"""The daemon's C heap over a long run: glibc keeps what threads freed, arena by arena.

Every check runs in a thread of its own (bounded by a deadline, ADR 0024), and the C libraries under a check
(drgn, libvirt, sqlite, lxml, cryptography) allocate from that thread's glibc arena. glibc gives threads that
run at the same time arenas of their own, up to 8 per core, and keeps memory freed inside an arena for reuse
rather than handing it back. The hour-long soak (bench/soak.py) saw the daemon's resident memory grow by one
~11 MiB arena every few minutes (120 → 146 MiB in 12 minutes; 16 arenas possible on 2 cores). Two arenas are
plenty for a daemon whose Python code runs under one lock anyway, and after each check the free pages inside
them are handed back (`malloc_trim`, which since glibc 2.8 covers every arena and whole free pages anywhere in
the heap, not only its top). Other C libraries (musl) have neither call: nothing is done there.
"""

from __future__ import annotations

import os
from typing import Any

from hostguard.host.libc import libc

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
ARENAS = 2


def _glibc() -> Any:
    """The C library if it is glibc (mallopt and malloc_trim are glibc's), else None."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # ValueError elsewhere
    except (ValueError, OSError):
        return None
    return libc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas in this process (call before starting threads). True if set."""
    glibc = _glibc()
    return bool(glibc is not None and glibc.mallopt(M_ARENA_MAX, arenas) == 1)


def release_free_memory() -> None:
    """Hand the free pages of every arena back to the system (a few milliseconds; after each check)."""
    glibc = _glibc()
    if glibc is not None:
        glibc.malloc_trim(0)
