"""jbd2 replay on every journal shape the kernel reads, written by tests/unit/jbd2_images.py on real mkfs.ext4
images and compared with e2fsck's replay: 32/64-bit tags, checksum v2/v3, revoke blocks under a superblock
without the revoke bit (issue 19: what the kernel writes on an ordinary ext4), a log that wraps (before the
fast-commit area when there is one), stale blocks with bad checksums, and fast commits to replay (refused,
named). The real kernel's journals: tests/integration/test_journal_kernel.py."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs import ImageSpec, Limits, UnsupportedLayout
from hostguard.imagefs.disk import open_disk
from hostguard.imagefs.extfs import ExtFilesystem
from hostguard.imagefs.journal import (
    INCOMPAT_64BIT,
    INCOMPAT_ASYNC_COMMIT,
    INCOMPAT_CSUM_V2,
    INCOMPAT_CSUM_V3,
    INCOMPAT_FAST_COMMIT,
)
from hostguard.imagefs.partitions import volumes
from tests.unit.inventory_images import make_ext, require_tools, sparse_copy
from tests.unit.jbd2_images import MAGIC_BYTES, LogWriter, Txn, assert_matches_e2fsck, open_fs


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools()


def fresh_image(d: Path, name: str, options: tuple[str, ...]) -> Path:
    tree = d / f"{name}-tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copyfile("/bin/busybox", tree / "bin" / "busybox")
    os.chmod(tree / "bin" / "busybox", 0o755)
    return make_ext(tree, d / f"{name}.raw", options=options)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shapes")
    return {
        "64bit": fresh_image(d, "64bit", ("-b", "4096")),
        "32bit": fresh_image(d, "32bit", ("-b", "4096", "-O", "^64bit,^metadata_csum")),
        "fc": fresh_image(d, "fc", ("-b", "4096", "-O", "fast_commit")),
        "1k": fresh_image(d, "1k", ("-b", "1024", "-O", "^64bit")),
    }


def copy(images: dict[str, Path], name: str, tmp_path: Path) -> Path:
    dest = tmp_path / f"{name}.raw"
    sparse_copy(images[name], dest)
    return dest


def block(seed: int, bs: int = 4096) -> bytes:
    return bytes([seed]) * bs


# T1 writes 300, 301 (starting with the jbd2 magic: escaped) and 302; T2 revokes 300 and writes 303; T3 writes
# 302 again; T4 has no commit block (the guest stopped mid-commit) and writes 304.
def four_transactions(bs: int = 4096) -> list[Txn]:
    return [
        Txn({300: block(1, bs), 301: MAGIC_BYTES + block(2, bs)[4:], 302: block(3, bs)}, commit_time=100),
        Txn({303: block(4, bs)}, revokes=[300], commit_time=101),
        Txn({302: block(5, bs)}, commit_time=102),
        Txn({304: block(6, bs)}, commit_time=103, commit=False),
    ]


SHAPES = {
    "32-bit tags": ("32bit", 0),
    "64-bit tags": ("64bit", INCOMPAT_64BIT),
    "csum v2, 64-bit": ("64bit", INCOMPAT_64BIT | INCOMPAT_CSUM_V2),
    "csum v3, 64-bit": ("64bit", INCOMPAT_64BIT | INCOMPAT_CSUM_V3),
    "csum v2, 32-bit": ("32bit", INCOMPAT_CSUM_V2),
    "csum v3, 32-bit": ("32bit", INCOMPAT_CSUM_V3),
    "1k blocks, csum v3": ("1k", INCOMPAT_CSUM_V3),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_revoke_blocks_without_the_revoke_bit_replay_as_e2fsck(
    images: dict[str, Path], tmp_path: Path, shape: str
) -> None:
    """Issue 19: the kernel's revoke blocks under a journal superblock without journal_incompat_revoke."""
    name, incompat = SHAPES[shape]
    image = copy(images, name, tmp_path)
    bs = 1024 if name == "1k" else 4096
    LogWriter(image, incompat).write(four_transactions(bs), start=1, sequence=7)
    fs = assert_matches_e2fsck(image)
    assert set(fs.remap) == {301, 302, 303}  # 300 revoked by a later transaction, 304 never committed
    assert fs.read(301 * bs, 4) == MAGIC_BYTES
    assert fs.read(302 * bs, bs) == block(5, bs)  # the later transaction wins


def test_a_64_bit_revoke_record_does_not_revoke_its_low_32_bits(images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(images, "64bit", tmp_path)
    txns = [Txn({300: block(1)}, commit_time=1), Txn(revokes=[(1 << 32) | 300], commit_time=2)]
    LogWriter(image, INCOMPAT_64BIT | INCOMPAT_CSUM_V3).write(txns, start=1, sequence=1)
    assert set(assert_matches_e2fsck(image).remap) == {300}


def test_a_tag_with_high_block_bits_outside_the_filesystem_is_corruption(
    images: dict[str, Path], tmp_path: Path
) -> None:
    image = copy(images, "64bit", tmp_path)
    LogWriter(image, INCOMPAT_64BIT).write([Txn({(1 << 32) | 300: block(1)})], start=1, sequence=1)
    with pytest.raises(ImageError, match="outside the filesystem"):
        open_fs(image)


@pytest.mark.parametrize("fast_commit", [False, True], ids=["plain", "fast-commit"])
def test_a_log_that_wraps_replays_as_e2fsck(images: dict[str, Path], tmp_path: Path, fast_commit: bool) -> None:
    """The log wraps at the end of the normal area: before the fast-commit area when there is one."""
    image = copy(images, "fc" if fast_commit else "64bit", tmp_path)
    incompat = INCOMPAT_64BIT | INCOMPAT_CSUM_V3 | (INCOMPAT_FAST_COMMIT if fast_commit else 0)
    writer = LogWriter(image, incompat)
    txns = [Txn({300 + i: block(10 + i) for i in range(4)}, commit_time=5), Txn({310: block(30)}, commit_time=6)]
    writer.write(txns, start=writer.last - 3, sequence=40)  # descriptor + 2 data blocks before the end
    assert writer.writes[4][0] == writer.first  # the third data block wrapped
    if fast_commit:
        # e2fsck 1.47.0 still wraps at the end of the fast-commit area (the bug the kernel fixed in "jbd2:
        # correct the end of the journal recovery scan range", in 6.1 stable too) and ends the log early:
        # here the oracle is the real kernel (tests/integration/test_journal_kernel.py).
        fs = open_fs(image)
        for n in range(4):
            assert fs.read((300 + n) * 4096, 4096) == block(10 + n)
    else:
        fs = assert_matches_e2fsck(image)
    assert set(fs.remap) == {300, 301, 302, 303, 310}


def test_fast_commits_to_replay_are_refused_naming_the_feature(images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(images, "fc", tmp_path)
    incompat = INCOMPAT_64BIT | INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT
    LogWriter(image, incompat, fc_head_tid=9).write([Txn({300: block(1)})], start=1, sequence=8)
    with pytest.raises(UnsupportedLayout, match="journal_fast_commit"):
        open_fs(image)


def test_a_stale_fast_commit_area_is_skipped(images: dict[str, Path], tmp_path: Path) -> None:
    """Fast commits of an older transaction: the kernel replays nothing from the area."""
    image = copy(images, "fc", tmp_path)
    incompat = INCOMPAT_64BIT | INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT
    LogWriter(image, incompat, fc_head_tid=5).write([Txn({300: block(1)})], start=1, sequence=8)
    assert set(open_fs(image).remap) == {300}


@pytest.mark.parametrize("what", ["descriptor", "revoke"])
@pytest.mark.parametrize("commit_time", [50, 200], ids=["older-commit", "newer-commit"])
def test_a_block_with_a_bad_checksum_is_decided_by_the_next_commit_time(
    images: dict[str, Path], tmp_path: Path, what: str, commit_time: int
) -> None:
    """Lazy journal init leaves stale blocks: a bad checksum followed by an older commit time ends the log
    there (stale), by a newer one fails the kernel's mount (corrupt): the check is then unavailable."""
    image = copy(images, "64bit", tmp_path)
    bad = Txn({302: block(3)}, revokes=[300], commit_time=commit_time)
    setattr(bad, f"bad_{what}", True)
    txns = [Txn({300: block(1)}, commit_time=100), Txn({301: block(2)}, commit_time=101), bad]
    LogWriter(image, INCOMPAT_64BIT | INCOMPAT_CSUM_V3).write(txns, start=1, sequence=1)
    if commit_time > 101:
        with pytest.raises(UnsupportedLayout, match="checksum does not match"):
            open_fs(image)
    else:
        assert set(assert_matches_e2fsck(image).remap) == {300, 301}


def test_a_stale_commit_block_with_a_bad_checksum_ends_the_log(images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(images, "64bit", tmp_path)
    txns = [Txn({300: block(1)}, commit_time=100), Txn({301: block(2)}, commit_time=10, bad_commit=True)]
    LogWriter(image, INCOMPAT_64BIT | INCOMPAT_CSUM_V3).write(txns, start=1, sequence=1)
    assert set(assert_matches_e2fsck(image).remap) == {300}


@pytest.mark.parametrize(
    ("compat", "incompat", "named"),
    [(1, 0, "journal_checksum"), (0, INCOMPAT_ASYNC_COMMIT, "journal_async_commit"), (0, 0x400, "unknown 0x400")],
)
def test_features_not_replayed_are_named(
    images: dict[str, Path], tmp_path: Path, compat: int, incompat: int, named: str
) -> None:
    image = copy(images, "32bit", tmp_path)
    writer = LogWriter(image, incompat)
    writer.write([Txn({300: block(1)})], start=1, sequence=1)
    if compat:
        offset = writer.journal.where(0) + 0x24
        with image.open("r+b") as fh:
            fh.seek(offset)
            fh.write(struct.pack(">I", compat))
    with pytest.raises(UnsupportedLayout, match=named):
        open_fs(image)


def test_an_ext_feature_not_read_is_named(tmp_path: Path) -> None:
    image = fresh_image(tmp_path, "encrypt", ("-O", "encrypt"))
    with pytest.raises(UnsupportedLayout, match=r"ext feature not supported: encrypt$"):
        open_fs(image, replay=False)


@pytest.mark.parametrize("what", ["data blocks", "revoke records"])
def test_a_log_longer_than_the_replay_bound_is_refused_naming_it(
    images: dict[str, Path], tmp_path: Path, what: str
) -> None:
    """The guest chooses its journal's length (the kernel takes a journal inode of any size; e2fsprogs makes up to
    10,240,000 blocks) and what a replay holds grows with the log: bounded by Limits.max_journal_blocks, counting
    the blocks walked and the revoke records (tests/faults/test_hostile_journal.py measures the cost)."""
    image = copy(images, "64bit", tmp_path)
    if what == "data blocks":
        txns = [Txn({300 + i: block(i) for i in range(40)}, commit_time=1)]  # 42 log blocks
    else:
        txns = [Txn({300: block(1)}, revokes=list(range(1000, 1400)), commit_time=1)]  # 4 log blocks, 400 records
    LogWriter(image, INCOMPAT_64BIT | INCOMPAT_CSUM_V3).write(txns, start=1, sequence=1)
    assert assert_matches_e2fsck(image).remap  # replayed under the default bound
    volume = volumes(open_disk(ImageSpec(image, "raw"), 0))[0]
    with pytest.raises(UnsupportedLayout, match=r"longer than 30 blocks and revoke records \(the bound max_journal"):
        ExtFilesystem(volume, Limits(max_journal_blocks=30), replay_journal=True)
