"""hostguard.host.digest with the state store as its cache: identity-keyed digests and one hashing per file."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from hostguard.errors import ImageError
from hostguard.host.digest import (
    Digested,
    DigestProcess,
    FileIdentity,
    digest_fd,
    digest_file,
    open_image,
    sha256_hex,
)
from hostguard.host.state import StateStore


def test_small_input_sha256_is_sha256() -> None:
    assert sha256_hex(b"a", b"", b"bc") == hashlib.sha256(b"abc").hexdigest()


def test_digests_are_cached_by_identity_and_a_new_ctime_misses(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    with StateStore(tmp_path / "state") as state:
        first = digest_file(image, state)
        assert first.sha256 == hashlib.sha256(image.read_bytes()).hexdigest() and not first.cached
        assert digest_file(image, state).cached
        time.sleep(0.01)
        st = image.stat()
        os.chown(image, st.st_uid, st.st_gid)  # a chown: same content, new ctime
        again = digest_file(image, state)
        assert not again.cached and again.sha256 == first.sha256


def test_a_second_process_waits_for_the_first_to_hash_the_same_file(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x" * 4096)
    ident = FileIdentity.from_stat(image.stat())
    result: list[Digested] = []
    with StateStore(tmp_path / "state") as first:
        first.cached_digest(ident)  # creates the database

        def second() -> None:
            with StateStore(tmp_path / "state") as other:
                fd = open_image(image)
                try:
                    result.append(digest_fd(fd, image, other))
                finally:
                    os.close(fd)

        with first.hash_lock(ident):
            worker = threading.Thread(target=second)
            worker.start()
            time.sleep(0.3)
            assert worker.is_alive(), "the second hasher did not wait for the lock"
            first.store_digest(ident, "f" * 64)  # what the first process found
        worker.join(10)
    assert result == [Digested(image, "f" * 64, 4096, ident, cached=True)]


def test_a_digest_process_hashes_the_file_it_was_given(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    job = DigestProcess(image)
    got = job.result()
    assert got.sha256 == hashlib.sha256(image.read_bytes()).hexdigest() and got.size == image.stat().st_size
    assert got.identity == FileIdentity.from_stat(image.stat()) and not got.cached
    assert job.fd == -1  # the descriptor is released


def test_a_digest_process_refuses_a_file_that_changed_meanwhile(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"a" * 4096)
    job = DigestProcess(image)
    with image.open("ab") as fh:
        fh.write(b"appended")
    with pytest.raises(ImageError, match=r"img changed while it was being hashed"):
        job.result()


def test_a_digest_process_refuses_symlinks_like_digest_file(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "img")
    with pytest.raises(ImageError, match=r"link is a symlink"):
        DigestProcess(tmp_path / "link")


def test_closing_a_digest_process_stops_the_child(tmp_path: Path) -> None:
    image = tmp_path / "sparse"
    with image.open("wb") as fh:
        fh.truncate(8 << 30)  # 8 GiB of holes: seconds of hashing
    job = DigestProcess(image)
    job.close()
    assert job.proc.returncode is not None and job.fd == -1
    job.close()  # idempotent


def test_large_input_sha256_is_sha256() -> None:
    data = os.urandom((1 << 20) + 17)  # past the switch to OpenSSL's SHA-256
    assert sha256_hex(data[:5], data[5:]) == hashlib.sha256(data).hexdigest()


def test_the_file_system_type_is_the_one_the_descriptor_is_on(tmp_path: Path) -> None:
    from hostguard.host.digest import LOCAL_FILESYSTEMS, cache_refusal, filesystem_type

    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    proc = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert filesystem_type(fd) in LOCAL_FILESYSTEMS
        assert cache_refusal(fd, tmp_path / "f") is None
        assert filesystem_type(proc) == "proc"
        assert cache_refusal(proc, Path("/proc/self/status")) == "on a proc file system"
    finally:
        os.close(fd)
        os.close(proc)
    assert filesystem_type(10**6) == "?"  # not an open descriptor: cannot tell, so no cache


def test_a_writer_opening_the_file_during_the_lease_check_does_not_end_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel signals a lease holder when a writer opens the file; by default with SIGIO, which would
    end the hook or the daemon. Here a writer arrives exactly while the lease is held."""
    import fcntl
    import subprocess
    import sys

    from hostguard.host import digest

    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 100)
    real = fcntl.fcntl
    writers: list[subprocess.Popen[bytes]] = []

    def fcntl_with_a_writer(fd: int, cmd: int, arg: int = 0) -> object:
        result = real(fd, cmd, arg)
        if cmd == fcntl.F_SETLEASE and arg == fcntl.F_RDLCK:
            writers.append(subprocess.Popen([sys.executable, "-c", f"open({str(image)!r}, 'r+b').write(b'y')"]))
            time.sleep(0.5)  # the writer now waits on the lease: the kernel has signalled us
        return result

    monkeypatch.setattr(fcntl, "fcntl", fcntl_with_a_writer)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert digest.cache_refusal(fd, image) is None
    finally:
        os.close(fd)
    assert writers and writers[0].wait(timeout=30) == 0
