"""The daemon's malloc arenas: limited to two whatever the number of threads, counted by glibc itself
(malloc_info), in a fresh process each (the limit holds for the life of a process)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.testbed.prereq import require

PROBE = r"""
import ctypes, os, sys, threading
from hostguard.host import heap
if sys.argv[1] == "limited":
    assert heap.limit_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
barrier = threading.Barrier(6)

def work():
    p = libc.malloc(4000)  # a thread's first allocation picks its arena
    barrier.wait()  # all six alive at once: each would get an arena of its own
    libc.free(p)

threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
heap.release_free_memory()
out = libc.fdopen(os.dup(1), b"w")
libc.malloc_info(0, out)
libc.fflush(out)
"""


def glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, AttributeError):
        return False


def arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return out.count("<heap nr=")


def test_threads_share_two_arenas_once_limited() -> None:
    require(glibc(), "malloc arenas are glibc's")
    assert arenas("free") >= 6  # the default: an arena per thread running at once (up to 8 per core)
    assert arenas("limited") <= 2
