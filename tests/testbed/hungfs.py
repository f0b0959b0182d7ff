"""A FUSE file system whose one file, `disk.qcow2`, never answers a read: a hung NFS server or FUSE daemon
holding a disk image. Lookups, stat and open answer (as a stuck network file system's cached attributes do);
every read waits until the file system is unmounted.

Run as a process (`python -m tests.testbed.hungfs MOUNTPOINT`), or through `hung_file()`, which mounts it,
yields the file's path and unmounts it (lazily: a reader still stuck in it is then answered with an error).
Needs /dev/fuse and Debian's python3-fusepy (module `fusepy`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAME = "disk.qcow2"
SIZE = 1 << 20


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


@contextlib.contextmanager
def hung_file(where: Path) -> Iterator[Path]:
    """Mount the hung file system at `where` (created); yields the path of its file."""
    where.mkdir(mode=0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.testbed.hungfs", str(where)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(where):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"the hung FUSE file system did not mount at {where}: {err.strip()}")
            time.sleep(0.05)
        yield where / NAME
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(where)], capture_output=True, check=False)
        proc.kill()
        proc.wait()
        with contextlib.suppress(OSError):
            where.rmdir()


if __name__ == "__main__":
    serve(sys.argv[1])
