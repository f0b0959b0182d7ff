"""Issue 15 item 3 under issue 14 item 3: digests hostguardd keeps under a read lease survive `touch`, and are
never trusted for a file opened for writing since it was hashed (docs/adr/0021-kept-digests.md).

The keeper runs as its own process (hostguard.poststart.digestkeeper, as hostguardd runs it); the attacks go
through the hook's decision on Nova's layout (tests/unit/test_preboot_stacks.py), with the base owned by a user
other than root, as Nova and libvirt's dynamic ownership leave it, so the identity-keyed cache of ADR 0007
cannot serve it: a hit there is the keeper's.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostguard.errors import VerificationError
from hostguard.host.digest import KEPT_DIR, FileIdentity, digest_file, kept_digest, open_image
from hostguard.host.state import StateStore
from hostguard.poststart.digestkeeper import DigestKeeper
from tests.testbed.pki import TestPKI
from tests.unit.test_preboot_stacks import Nova

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
_CHILD = """import sys
from pathlib import Path
from hostguard.poststart.digestkeeper import DigestKeeper
keeper = DigestKeeper(Path(sys.argv[1]), tuple(Path(d) for d in sys.argv[2:]))
keeper.start()
print(keeper.scan(), flush=True)
for line in sys.stdin:
    print(keeper.scan(), flush=True)
keeper.close()
"""


class KeeperProcess:
    """The keeper in its own process (the hook must see another process's lease); `scan()` lists the watched
    directories now and returns how many files it newly kept."""

    def __init__(self, state: Path, *dirs: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(state), *map(str, dirs)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.first = self._answer()

    def _answer(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the keeper process died"
        return int(line)

    def scan(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("scan\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(20)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def nova(tmp_path: Path, pki: TestPKI) -> Iterator[Nova]:
    nova = Nova(tmp_path, pki)
    nova.state.mkdir(mode=0o700)
    os.chown(nova.base, NOBODY, NOBODY)  # what Nova and libvirt's dynamic ownership make of a base
    yield nova


@pytest.fixture
def keeper(nova: Nova) -> Iterator[KeeperProcess]:
    process = KeeperProcess(nova.state, nova.base.parent)
    deadline = time.monotonic() + 60  # its own first pass may still be hashing when the explicit scan runs
    while kept_now(nova) is None:
        assert time.monotonic() < deadline, "the keeper kept nothing"
        process.scan()
    yield process
    process.close()


def base_source(nova: Nova) -> str:
    """How the start had the base's digest, as the audit record says it ("hashed", "cached", "kept")."""
    digests = nova.decide().summary()["digests"]
    return str(next(d["from"] for d in digests if d["path"] == str(nova.base)))


def kept_now(nova: Nova) -> str | None:
    fd = open_image(nova.base)
    try:
        return kept_digest(nova.state, fd, FileIdentity.from_stat(os.fstat(fd)))
    finally:
        os.close(fd)


# --- the fast path -------------------------------------------------------------------------------------------


def test_utime_of_a_kept_base_then_start_does_not_rehash(nova: Nova, keeper: KeeperProcess) -> None:
    assert base_source(nova) == "kept"
    for _ in range(2):
        os.utime(nova.base)  # what Nova does at every spawn: new mtime and ctime
        os.chown(nova.base, NOBODY, NOBODY)  # and libvirt's relabelling
        assert base_source(nova) == "kept"
    assert kept_now(nova) == hashlib.sha256(nova.base.read_bytes()).hexdigest()


def test_without_the_keeper_a_user_owned_base_is_hashed_at_every_start(nova: Nova) -> None:
    for _ in range(2):
        assert base_source(nova) == "hashed"  # the conservative path of ADR 0007 stays the fallback


# --- attacks ------------------------------------------------------------------------------------------------


def test_open_for_write_and_mmap_store_without_mtime_change_is_not_trusted(nova: Nova, keeper: KeeperProcess) -> None:
    assert base_source(nova) == "kept"
    fd = os.open(nova.base, os.O_RDWR)  # breaks the lease: the keeper drops the row and lets the writer on
    try:
        mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        mapping[0:1] = mapping[0:1]  # dirty the first page; the bytes are still the signed ones
        before = os.stat(nova.base)
        mapping[16:20] = b"evil"  # a store into the dirty page: mtime and ctime stay
        after = os.stat(nova.base)
        assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
        keeper.scan()  # the writer's mapping is still there: the keeper cannot lease (or keep) it again
        assert kept_now(nova) is None
        with pytest.raises(VerificationError, match=r"not signed|does not match|not a disk of"):
            nova.decide()  # hashed again: the tampered base is denied
    finally:
        mapping.close()


def test_a_writer_that_closed_is_rehashed_before_the_base_is_kept_again(nova: Nova, keeper: KeeperProcess) -> None:
    with nova.base.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"evil")
    os.utime(nova.base, ns=(0, 0))  # even the old times back: the kernel keeps ctime
    keeper.scan()
    assert kept_now(nova) in (None, hashlib.sha256(nova.base.read_bytes()).hexdigest())
    with pytest.raises(VerificationError):
        nova.decide()


def test_a_lease_being_broken_is_not_trusted(nova: Nova, keeper: KeeperProcess) -> None:
    """The keeper stopped (SIGSTOP) while a writer waits on its lease: /proc shows it BREAKING, the row is still
    there, and the hook must not trust it."""
    assert kept_now(nova) is not None
    os.kill(keeper.proc.pid, signal.SIGSTOP)
    opened = threading.Event()

    def writer() -> None:
        os.close(os.open(nova.base, os.O_WRONLY))  # blocks until the lease is released
        opened.set()

    thread = threading.Thread(target=writer, daemon=True)
    try:
        thread.start()
        breaking = f"BREAKING  UNLCK {keeper.proc.pid} ".encode()
        while breaking not in Path("/proc/locks").read_bytes():
            time.sleep(0.01)
        assert list((nova.state / KEPT_DIR).iterdir())  # the row is still there
        assert kept_now(nova) is None
        assert base_source(nova) == "hashed"
    finally:
        os.kill(keeper.proc.pid, signal.SIGCONT)
    thread.join(30)
    assert opened.is_set()


def test_lease_holder_killed_is_not_trusted(nova: Nova, keeper: KeeperProcess) -> None:
    assert kept_now(nova) is not None
    keeper.proc.kill()
    keeper.proc.wait()
    assert list((nova.state / KEPT_DIR).iterdir()), "the killed keeper's row stays behind"
    assert kept_now(nova) is None
    assert base_source(nova) == "hashed"


def test_a_base_replaced_by_rename_is_not_trusted(nova: Nova, keeper: KeeperProcess) -> None:
    assert kept_now(nova) is not None
    forged = nova.base.with_name("forged")
    data = bytearray(nova.base.read_bytes())
    data[100:104] = b"evil"
    forged.write_bytes(bytes(data))
    os.chown(forged, NOBODY, NOBODY)
    forged.rename(nova.base)  # the kept inode is no longer the file the start opens
    assert kept_now(nova) is None
    with pytest.raises(VerificationError):
        nova.decide()


def test_a_kept_row_a_user_could_write_is_not_trusted(nova: Nova, keeper: KeeperProcess) -> None:
    row = next((nova.state / KEPT_DIR).iterdir())
    os.chown(row, NOBODY, NOBODY)
    assert kept_now(nova) is None
    os.chown(row, 0, 0)
    os.chown(nova.state / KEPT_DIR, NOBODY, NOBODY)
    assert kept_now(nova) is None


def test_a_row_naming_a_lease_a_user_holds_is_not_trusted(nova: Nova, keeper: KeeperProcess) -> None:
    """The row's process must run as root: a user's own lease on a file it owns proves nothing."""
    row = next((nova.state / KEPT_DIR).iterdir())
    fields = row.read_text().split()
    base = os.open(nova.base, os.O_RDONLY)
    try:
        holder = subprocess.Popen(
            [sys.executable, "-I", "-c", HOLDER, str(base)], stdout=subprocess.PIPE, text=True, user=NOBODY,
            pass_fds=(base,),
        )  # fmt: skip
    finally:
        os.close(base)
    try:
        assert holder.stdout is not None
        fd, started = holder.stdout.readline().split()
        fields[4:7] = [str(holder.pid), started, fd]
        row.write_text(" ".join(fields) + "\n")
        assert kept_now(nova) is None
    finally:
        holder.kill()
        holder.wait()


# A user's process leasing the base it owns (the descriptor is inherited: the test's directory is root-only).
HOLDER = """import fcntl, os, sys, time
fd = int(sys.argv[1])
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
stat = open(f"/proc/{os.getpid()}/stat").read()
print(fd, stat[stat.rindex(")") + 2 :].split()[19], flush=True)
time.sleep(60)
"""


# --- the keeper itself (in this process) ---------------------------------------------------------------------


def test_the_keeper_forgets_a_removed_file_and_releases_it(tmp_path: Path) -> None:
    images, state = tmp_path / "images", tmp_path / "state"
    images.mkdir()
    state.mkdir(mode=0o700)
    image = images / "base"
    image.write_bytes(os.urandom(1 << 20))
    (images / "base.hgsig").write_bytes(b"{}")  # envelopes are not images
    keeper = DigestKeeper(state, (images,))
    keeper.start()
    try:
        keeper.scan()
        assert [e.path for e in keeper.entries.values()] == [image]
        image.unlink()
        keeper.scan()
        assert keeper.entries == {} and list((state / KEPT_DIR).iterdir()) == []
    finally:
        keeper.close()


def test_the_keeper_releases_a_broken_lease_at_once_and_removes_the_row_first(tmp_path: Path) -> None:
    images, state = tmp_path / "images", tmp_path / "state"
    images.mkdir()
    state.mkdir(mode=0o700)
    image = images / "base"
    image.write_bytes(b"x" * 4096)
    keeper = DigestKeeper(state, (images,))
    keeper.start()
    try:
        keeper.scan()
        with StateStore(state) as store:
            assert digest_file(image, store).kept
        fd = os.open(image, os.O_WRONLY)  # returns once the keeper let go (its signal thread, not 45 s)
        try:
            assert keeper.entries == {} and list((state / KEPT_DIR).iterdir()) == []
            os.pwrite(fd, b"y", 0)
        finally:
            os.close(fd)
        keeper.scan()  # kept again only through a new lease and a new hash
        with StateStore(state) as store:
            again = digest_file(image, store)
        assert again.sha256 == hashlib.sha256(b"y" + b"x" * 4095).hexdigest()
    finally:
        keeper.close()
    assert list((state / KEPT_DIR).iterdir()) == []
