"""ext journal replay in memory (imagefs.journal) against e2fsck's own replay (`e2fsck -E journal_only`), and
the refusals that keep a hostile journal from passing a tampered disk."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs import UnsupportedLayout
from hostguard.imagefs.journal import _Journal
from tests.unit.diskcheck_images import debugfs, full_inventory_raw, journaled
from tests.unit.inventory_images import make_ext, require_tools, sparse_copy
from tests.unit.jbd2_images import assert_matches_e2fsck, e2fsck_replayed, open_fs

JBD2_MAGIC = b"\xc0\x3b\x39\x98"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("journal")
    tree = d / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copyfile("/bin/busybox", tree / "bin" / "busybox")
    os.chmod(tree / "bin" / "busybox", 0o755)
    return make_ext(tree, d / "fresh.raw", options=("-b", "4096"))


def journal_three_transactions(image: Path, directory: Path, *, csum: bool) -> None:
    """Transaction 1 writes 300 and 301 (301 starts with the jbd2 magic: escaped), transaction 2 writes 302,
    transaction 3 revokes 300 (so 1's copy of it must not be replayed)."""
    a, b = directory / "a", directory / "b"
    a.write_bytes(os.urandom(4096) + JBD2_MAGIC + os.urandom(4092))
    b.write_bytes(os.urandom(4096))
    debugfs(image, ["jo -c" if csum else "jo", f"jw -b 300,301 {a}", "jc", "jo", f"jw -b 302 {b}", "jw -r 300", "jc"])


@pytest.mark.parametrize("csum", [False, True], ids=["plain", "csum-v3"])
def test_replay_matches_e2fsck(tmp_path: Path, fresh: Path, csum: bool) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=csum)
    fs = assert_matches_e2fsck(image)
    assert fs.needed_recovery
    assert set(fs.remap) == {301, 302}  # 300 was revoked by a later transaction
    assert fs.remap[301][1] is True  # escaped: the magic is restored on replay
    assert fs.read(301 * 4096, 4) == JBD2_MAGIC


def test_a_filesystem_change_only_in_the_journal_is_seen(tmp_path: Path, fresh: Path) -> None:
    """A new setuid executable committed to the journal but not yet checkpointed: the inventory of the
    replayed view lists it exactly as the inventory of e2fsck's replay does."""
    changed = tmp_path / "changed.raw"
    sparse_copy(fresh, changed)
    debugfs(changed, ["write /bin/busybox /bin/evil", "sif /bin/evil mode 0104755"])
    image = tmp_path / "journaled.raw"
    blocks = journaled(fresh, changed, image, csum=True)
    assert blocks
    found = {f.path: f for f in full_inventory_raw(image)}
    assert found["/bin/evil"].mode == 0o4755
    replayed = tmp_path / "replayed.raw"
    replayed.write_bytes(e2fsck_replayed(image))
    assert full_inventory_raw(image) == full_inventory_raw(replayed) == full_inventory_raw(changed)


def test_without_replay_a_dirty_journal_is_refused(tmp_path: Path, fresh: Path) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=False)
    with pytest.raises(UnsupportedLayout, match="needs recovery"):
        open_fs(image, replay=False)


def _journal_block_offset(image: Path, n: int) -> int:
    """Volume offset of journal block n (asked before the test damages the journal)."""
    return _Journal(open_fs(image)).where(n)


def test_a_commit_block_with_a_bad_checksum_makes_the_check_unavailable(tmp_path: Path, fresh: Path) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=True)
    commit = _journal_block_offset(image, 4)  # descriptor 1, data 2-3, commit 4
    with open(image, "r+b") as fh:
        fh.seek(commit + 48)  # h_commit_sec: covered by the checksum
        fh.write(b"\x01")
    with pytest.raises(UnsupportedLayout, match=r"commit block .* checksum mismatch"):
        open_fs(image)


def test_a_data_block_with_a_bad_checksum_makes_the_check_unavailable(tmp_path: Path, fresh: Path) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=True)
    data = _journal_block_offset(image, 3)  # the copy of block 301
    with open(image, "r+b") as fh:
        fh.seek(data + 100)
        fh.write(b"tampered")
    with pytest.raises(UnsupportedLayout, match="data block for fs block 301"):
        open_fs(image)


def test_an_uncommitted_transaction_is_not_replayed(tmp_path: Path, fresh: Path) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=False)
    second_commit = _journal_block_offset(image, 7)  # transaction 2: descriptor 5, data 6, commit 7
    with open(image, "r+b") as fh:
        fh.seek(second_commit)
        assert fh.read(4) == JBD2_MAGIC
        fh.seek(second_commit)
        fh.write(b"\0" * 4096)  # the log now ends after transaction 1
    fs = assert_matches_e2fsck(image)
    assert set(fs.remap) == {300, 301}  # 3's revoke is gone with the end of the log


def test_a_checkpointed_journal_replays_nothing(tmp_path: Path, fresh: Path) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=False)
    sb = _journal_block_offset(image, 0)
    with open(image, "r+b") as fh:
        fh.seek(sb + 0x1C)
        fh.write(struct.pack(">I", 0))  # s_start = 0: nothing to recover
    fs = open_fs(image)
    assert fs.needed_recovery and fs.remap == {}


def test_a_journal_start_outside_the_journal_is_corruption(tmp_path: Path, fresh: Path) -> None:
    image = tmp_path / "dirty.raw"
    sparse_copy(fresh, image)
    journal_three_transactions(image, tmp_path, csum=False)
    sb = _journal_block_offset(image, 0)
    with open(image, "r+b") as fh:
        fh.seek(sb + 0x1C)
        fh.write(struct.pack(">I", 1 << 30))
    with pytest.raises(ImageError, match="journal start"):
        open_fs(image)
