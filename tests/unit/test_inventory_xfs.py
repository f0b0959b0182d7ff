"""The fast reader on XFS images built by mkfs.xfs (and populated by the kernel through a loop mount),
checked against the source tree read from the host side; hostile XFS metadata gives an `ImageError`."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs import Limits
from hostguard.imagefs.inventory import InventoryResult, inventory
from hostguard.imagefs.readers import open_reader
from hostguard.signed.manifest import FileEntry
from tests.testbed.prereq import require
from tests.unit import inventory_images as imgs
from tests.unit.test_inventory_fuzz import _small_tree


def run(path: Path, fmt: str = "raw", *, limits: Limits | None = None) -> InventoryResult:
    kwargs = {"limits": limits} if limits is not None else {}
    with open_reader([(path, fmt)], "fast", **kwargs) as reader:
        return inventory(reader, workers=2)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    imgs.require_tools()
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs is not installed (xfsprogs)")
    root = tmp_path_factory.mktemp("xinv") / "tree"
    imgs.write_tree(root)
    return root


@pytest.fixture(scope="module")
def expected(tree: Path) -> dict[str, FileEntry]:
    return imgs.expected_components(tree)


# mkfs.xfs layouts: v5 (crc, ftype, 512-byte inodes: the default), large inodes, no sparse inode chunks,
# no reflink, more allocation groups (inodes outside AG 0). No v4: the host kernel cannot mount it to populate.
XFS_VARIANTS: dict[str, tuple[str, ...]] = {
    "xfs-default": (),
    "xfs-no-sparse-inodes": ("-i", "sparse=0"),
    "xfs-8-ags": ("-d", "agcount=8", "-l", "size=64m"),
    "xfs-1k-inodes": ("-i", "size=1024"),
    "xfs-no-reflink": ("-m", "reflink=0"),
}


@pytest.mark.parametrize("variant", sorted(XFS_VARIANTS))
def test_every_xfs_variant_matches_the_host_view(
    variant: str, tree: Path, expected: dict[str, FileEntry], tmp_path: Path
) -> None:
    image = imgs.make_xfs(tree, tmp_path / f"{variant}.raw", options=XFS_VARIANTS[variant], size_mb=1024)
    result = run(image)
    assert {f.path: f for f in result.files} == expected
    assert result.reader == "fast"
    caps = {f.path: f.capabilities for f in result.files if f.capabilities}
    assert set(caps) == {"/usr/bin/ping", "/usr/bin/cap-noexec"}
    assert expected["/usr/bin/suid"].mode == 0o4755


def test_xfs_in_qcow2_and_auto_picks_the_fast_reader(
    tree: Path, expected: dict[str, FileEntry], tmp_path: Path
) -> None:
    raw = imgs.make_xfs(tree, tmp_path / "x.raw")
    qcow2 = imgs.to_qcow2(raw, tmp_path / "x.qcow2")
    with open_reader([(qcow2, "qcow2")], "auto") as reader:
        assert reader.name == "fast"
        assert [f.fstype for f in reader.filesystems()] == ["xfs"]
        result = inventory(reader, workers=2)
    assert {f.path: f for f in result.files} == expected


def test_xfs_content_preallocated_extents_read_as_zeros(tmp_path: Path) -> None:
    """`fallocate` leaves unwritten extents: the kernel reads zeros there, so must we (dissect reads the
    stale blocks underneath)."""
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs is not installed (xfsprogs)")
    root = tmp_path / "tree"
    root.mkdir()
    image = imgs.make_xfs(root, tmp_path / "p.raw")
    mnt = tmp_path / "m"
    mnt.mkdir()
    imgs.run("mount", "-o", "loop", image, mnt)
    try:
        # Stale bytes on the blocks first, then a preallocated file that may reuse them.
        (mnt / "junk").write_bytes(b"\xaa" * (4 << 20))
        os.sync()
        (mnt / "junk").unlink()
        os.sync()
        imgs.run("fallocate", "-l", str(4 << 20), mnt / "prealloc")
        with (mnt / "prealloc").open("r+b") as fh:
            fh.write(b"#!/bin/sh\n")
        (mnt / "prealloc").chmod(0o755)
        want = hashlib.sha256((mnt / "prealloc").read_bytes()).hexdigest()
    finally:
        imgs.run("umount", mnt)
    got = {f.path: f for f in run(image).files}
    assert got["/prealloc"].sha256 == want


def test_xfs_with_directory_blocks_larger_than_fs_blocks_falls_back(tree: Path, tmp_path: Path) -> None:
    """1 KiB blocks give 4 KiB directory blocks, which dissect.xfs does not walk: refused by name."""
    image = imgs.make_xfs(tree, tmp_path / "k.raw", options=("-b", "size=1024"))
    with pytest.raises(ImageError, match="directory blocks larger than filesystem blocks; use --reader guestfs"):
        run(image)


def test_corrupt_xfs_superblock_is_an_image_error(tree: Path, tmp_path: Path) -> None:
    image = imgs.make_xfs(tree, tmp_path / "c.raw")
    with image.open("r+b") as fh:
        fh.seek(4)
        fh.write(b"\x00\x00\x00\x03")  # block size 3
    with pytest.raises(ImageError, match="invalid block size"):
        run(image)


# --- fuzz -----------------------------------------------------------------------------------------------

FUZZ_LIMITS = Limits(max_file_bytes=64 << 20, max_nodes=10_000, max_extents=10_000)


@pytest.fixture(scope="module", params=["v5", "v5-1k-inodes"])
def small_xfs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bytes, list[int]]:
    """A small XFS image, its bytes, and the offsets worth corrupting: non-zero bytes of the AG headers,
    inodes and directory blocks (the first 512 KiB of each allocation group)."""
    imgs.require_tools()
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs is not installed (xfsprogs)")
    base = tmp_path_factory.mktemp("xfuzz")
    _small_tree(base / "tree")
    opts = {"v5": (), "v5-1k-inodes": ("-i", "size=1024")}[request.param]
    image = imgs.make_xfs(base / "tree", base / "small.raw", options=(*opts, "-d", "agcount=2"), size_mb=32)
    data = image.read_bytes()
    half = len(data) // 2
    targets = [i for start in (0, half) for i in range(start, start + (512 << 10)) if data[i]]
    return image, data, targets


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=8))
def test_xfs_corruption_gives_a_result_or_an_image_error(
    small_xfs: tuple[Path, bytes, list[int]], tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    _image, original, targets = small_xfs
    bad = imgs.fuzz_copy(tmp_path / "bad.raw", original)  # one copy per test run: an example puts its bytes back
    changed = imgs.flipped(original, targets, flips)
    imgs.write_at(bad, changed)
    try:
        with open_reader([(bad, "raw")], "fast", limits=FUZZ_LIMITS) as reader:
            result = inventory(reader, workers=2)
    except ImageError as err:
        assert "\n" not in str(err)
        return
    finally:
        imgs.write_at(bad, {at: original[at : at + 1] for at in changed})
    assert list(result.files) == sorted(result.files)
