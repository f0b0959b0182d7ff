"""FUSE file systems for hung storage: a hung NFS server or FUSE daemon holding a disk image.

Two modes:

- hung (`hung_file()`): one file, `disk.qcow2`, that never answers a read. Lookups, stat and open answer (as a
  stuck network file system's cached attributes do); every read waits until the file system is unmounted.
- passthrough (`passthrough_storage()`): the files of a real directory (the store), served as they are (read,
  write, fsync, chown for libvirt's relabelling, ...), until the test throws the switch (`Storage.hang()`, a
  file the server looks for at each read): from then on every read waits until the file system is unmounted,
  and the thread id of each waiting reader is logged (`Storage.blocked_readers()`). Only reads hang: writes,
  fsync, stat, open and chown still answer (a QEMU whose idle guest does no I/O can still be paused and
  resumed). Mounted with `direct_io`, so no read is served from the page cache.

Run as a process (`python -m tests.testbed.hungfs MOUNTPOINT [--store DIR --switch FILE --readers FILE]`), or
through the context managers, which mount it, yield and unmount it lazily and end the server: a reader still
stuck in it is then answered with an error (the connection is aborted).
Needs /dev/fuse and Debian's python3-fusepy (module `fusepy`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "disk.qcow2"
SIZE = 1 << 20
STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_blocks", "st_rdev")


def serve(mountpoint: str) -> None:
    import fusepy  # type: ignore[import-untyped]  # Debian's python3-fusepy (only this process needs it)

    forever = threading.Event()

    class Hung(fusepy.Operations):  # type: ignore[misc]
        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            now = time.time()
            times = {"st_ctime": now, "st_mtime": now, "st_atime": now, "st_uid": 0, "st_gid": 0}
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **times}
            if path == f"/{NAME}":
                return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": SIZE, **times}
            raise fusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", NAME]

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            forever.wait()  # never set: the reader waits till the unmount
            raise fusepy.FuseOSError(errno.EIO)

    fusepy.FUSE(Hung(), mountpoint, foreground=True, allow_other=True, ro=True)


def serve_passthrough(mountpoint: str, store: str, switch: str, readers: str) -> None:
    """The store's files at `mountpoint`; reads hang once `switch` exists (see the module docstring)."""
    import fusepy

    forever = threading.Event()
    log_lock = threading.Lock()

    def real(path: str) -> str:
        return os.path.join(store, path.lstrip("/"))

    def oserror(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            raise fusepy.FuseOSError(err.errno or errno.EIO) from None

    class Passthrough(fusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            st = oserror(os.lstat, real(path))
            times = {key: getattr(st, f"{key}_ns") for key in ("st_atime", "st_mtime", "st_ctime")}  # use_ns
            return {**{key: getattr(st, key) for key in STAT_FIELDS}, **times}

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", *oserror(os.listdir, real(path))]

        def open(self, path: str, flags: int) -> int:
            return int(oserror(os.open, real(path), flags & ~os.O_CREAT))

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if os.path.exists(switch):
                with log_lock, open(readers, "a") as out:
                    out.write(f"{fusepy.fuse_get_context()[2]} {path} {offset} {size}\n")
                forever.wait()  # never set: the reader waits till the unmount
                raise fusepy.FuseOSError(errno.EIO)
            return bytes(oserror(os.pread, fh, size, offset))

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return int(oserror(os.pwrite, fh, data, offset))

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            oserror(os.truncate, real(path), length)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            oserror(os.fdatasync if datasync else os.fsync, fh)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:  # libvirt's DAC relabelling, and its restore
            oserror(os.chown, real(path), uid, gid, follow_symlinks=False)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            oserror(os.chmod, real(path), mode)
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            if times is None:
                oserror(os.utime, real(path))
            else:
                oserror(os.utime, real(path), ns=times)
            return 0

        def statfs(self, path: str) -> dict[str, Any]:
            sv = oserror(os.statvfs, real(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag")
            return {key: getattr(sv, key) for key in (*keys, "f_frsize", "f_namemax")}

    fusepy.FUSE(Passthrough(), mountpoint, foreground=True, allow_other=True, use_ino=True, direct_io=True)


@contextlib.contextmanager
def _mounted(where: Path, args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    where.mkdir(mode=0o755)
    # The server's stderr in a file, not a pipe: a server whose pipe filled up would hang on its own log.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.testbed.hungfs", str(where), *args],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(where):
                if proc.poll() is not None or time.monotonic() > deadline:
                    errors.seek(0)
                    err = errors.read().decode(errors="replace")
                    raise RuntimeError(f"the hung FUSE file system did not mount at {where}: {err.strip()}")
                time.sleep(0.05)
            yield proc
        finally:
            subprocess.run(["fusermount", "-u", "-z", str(where)], capture_output=True, check=False)
            proc.kill()  # closes /dev/fuse: the kernel aborts the connection, a stuck reader gets an error
            proc.wait()
            with contextlib.suppress(OSError):
                where.rmdir()


@contextlib.contextmanager
def hung_file(where: Path) -> Iterator[Path]:
    """Mount the hung file system at `where` (created); yields the path of its file."""
    with _mounted(where, []):
        yield where / NAME


@dataclass
class Storage:
    """A passthrough FUSE mount of `store` at `mountpoint` (see `passthrough_storage`)."""

    mountpoint: Path
    store: Path
    switch: Path
    readers: Path
    server: subprocess.Popen[bytes]

    def hang(self) -> None:
        """From now on every read waits (until the unmount)."""
        self.switch.touch()

    def blocked_readers(self) -> list[int]:
        """Thread ids of the readers waiting in the file system (each read that hung, in order)."""
        try:
            return [int(line.split()[0]) for line in self.readers.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def unmount(self) -> None:
        """Unmount lazily and end the server: every read still waiting gets an error."""
        subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False)
        self.server.kill()
        self.server.wait()


@contextlib.contextmanager
def passthrough_storage(where: Path) -> Iterator[Storage]:
    """The directory `where`.store (created) served at `where` (created) until `Storage.hang()`. Yields the
    Storage; at the end unmounts lazily, ends the server and removes the store and the switch."""
    store = where.with_name(f"{where.name}.store")
    switch = where.with_name(f"{where.name}.hang")
    readers = where.with_name(f"{where.name}.readers")
    store.mkdir(mode=0o755)
    try:
        args = ["--store", str(store), "--switch", str(switch), "--readers", str(readers)]
        with _mounted(where, args) as server:
            yield Storage(where, store, switch, readers, server)
    finally:
        for path in (switch, readers):
            path.unlink(missing_ok=True)
        for child in store.iterdir():
            child.unlink()
        store.rmdir()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed.hungfs")
    parser.add_argument("mountpoint")
    parser.add_argument("--store", help="serve this directory's files (passthrough) instead of the hung file")
    parser.add_argument("--switch", help="with --store: reads hang once this file exists")
    parser.add_argument("--readers", help="with --store: where the waiting readers' thread ids are logged")
    args = parser.parse_args(argv)
    if args.store is None:
        serve(args.mountpoint)
    elif args.switch is None or args.readers is None:
        parser.error("--store needs --switch and --readers")
    else:
        serve_passthrough(args.mountpoint, args.store, args.switch, args.readers)


if __name__ == "__main__":
    main(sys.argv[1:])
