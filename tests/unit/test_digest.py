"""hostguard.digest with the state store as its cache: identity-keyed digests and one hashing per file."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from hostguard.digest import Digested, FileIdentity, digest_fd, digest_file, open_image, sha256_hex
from hostguard.state import StateStore


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
