"""Which change notifications see a store through a shared writable mmap? (ADR 0021 measures, not assumes.)

    .venv/bin/python bench/probe_change_notification.py [DIR]      (root: fanotify needs CAP_SYS_ADMIN)

Marks one file with fanotify (FAN_OPEN | FAN_MODIFY | FAN_CLOSE_WRITE) and inotify (IN_OPEN | IN_MODIFY |
IN_CLOSE_WRITE), and holds a read lease on it (F_SETLEASE F_RDLCK, through a thread that waits for the break
signal). Then: open O_RDWR, mmap shared writable, a first store (dirties the page), a second store into the
dirty page, msync, write(2), close. After each step it prints what each mechanism reported and the lease state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import select
import signal
import struct
import sys
import tempfile
import threading

FAN_CLASS_NOTIF, FAN_MARK_ADD = 0x0, 0x1
FAN_MODIFY, FAN_CLOSE_WRITE, FAN_OPEN = 0x2, 0x8, 0x20
IN_MODIFY, IN_CLOSE_WRITE, IN_OPEN, IN_NONBLOCK = 0x2, 0x8, 0x20, 0o4000
AT_FDCWD = -100
NAMES = {FAN_MODIFY: "MODIFY", FAN_CLOSE_WRITE: "CLOSE_WRITE", FAN_OPEN: "OPEN"}  # same bits for both APIs


def drain_fanotify(fd: int) -> list[str]:
    out = []
    while select.select([fd], [], [], 0.05)[0]:
        data = os.read(fd, 4096)
        offset = 0
        while offset < len(data):
            length, _ver, _res, _meta, mask, event_fd, _pid = struct.unpack_from("IBBHQii", data, offset)
            out += [n for bit, n in NAMES.items() if mask & bit]
            if event_fd >= 0:
                os.close(event_fd)
            offset += length
    return out


def drain_inotify(fd: int) -> list[str]:
    out = []
    while select.select([fd], [], [], 0.05)[0]:
        data = os.read(fd, 4096)
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, name_len = struct.unpack_from("iIII", data, offset)
            out += [n for bit, n in NAMES.items() if mask & bit]
            offset += 16 + name_len
    return out


def main() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    directory = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    fd_, path = tempfile.mkstemp(dir=directory)
    os.write(fd_, b"\0" * 8192)
    os.close(fd_)
    fan = libc.fanotify_init(FAN_CLASS_NOTIF, os.O_RDONLY)
    if fan < 0:
        print("fanotify_init:", os.strerror(ctypes.get_errno()))
        return 1
    if libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_OPEN | FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD, path.encode()) < 0:
        print("fanotify_mark:", os.strerror(ctypes.get_errno()))
        return 1
    ino = libc.inotify_init1(IN_NONBLOCK)
    libc.inotify_add_watch(ino, path.encode(), IN_OPEN | IN_MODIFY | IN_CLOSE_WRITE)

    lease_fd = os.open(path, os.O_RDONLY)
    broken = threading.Event()
    ready = threading.Event()

    def holder() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGURG})
        fcntl.fcntl(lease_fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(lease_fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(lease_fd, 15, struct.pack("ii", 0, threading.get_native_id()))  # F_SETOWN_EX, F_OWNER_TID
        ready.set()
        if signal.sigtimedwait({signal.SIGURG}, 10) is not None:
            broken.set()
            fcntl.fcntl(lease_fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    ready.wait()
    drain_fanotify(fan), drain_inotify(ino)  # the lease holder's own open

    def report(step: str) -> None:
        st = os.stat(path)
        print(
            f"{step:34} fanotify {drain_fanotify(fan) or '-'!s:28} inotify {drain_inotify(ino) or '-'!s:28} "
            f"lease broken: {broken.is_set()!s:5} mtime {st.st_mtime_ns} ctime {st.st_ctime_ns}"
        )

    fd = os.open(path, os.O_RDWR)
    report("open O_RDWR")
    mapping = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    report("mmap MAP_SHARED PROT_WRITE")
    mapping[0:1] = b"\1"
    report("first store (page made dirty)")
    mapping[1:2] = b"\2"
    report("store into the dirty page")
    mapping.flush()
    report("msync")
    os.pwrite(fd, b"x", 4096)
    report("pwrite")
    mapping.close()
    os.close(fd)
    report("munmap + close")
    os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
