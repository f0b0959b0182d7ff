"""Hostile images: random corruption of filesystem metadata must give a complete inventory or one clean
`ImageError` — never another exception (a traceback), never a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs import Limits
from hostguard.imagefs.inventory import inventory
from hostguard.imagefs.readers import open_reader
from tests.unit import inventory_images as imgs

METADATA_BYTES = 1 << 20  # superblock, descriptors, bitmaps, inode tables and directories of a small fs
LIMITS = Limits(max_file_bytes=64 << 20)


def _small_tree(root: Path) -> None:
    root.mkdir()
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF" + os.urandom(20000))
    (root / "bin/tool").chmod(0o755)
    (root / "bin/link").symlink_to("tool")
    os.link(root / "bin/tool", root / "bin/hard")
    (root / "lib").mkdir()
    (root / "lib/lib.so").write_bytes(b"\x7fELF" + bytes(5000))
    for i in range(40):
        (root / f"lib/f{i}").write_bytes(b"data %d\n" % i)
    (root / "etc").mkdir()
    (root / "etc/fstab").write_text("LABEL=x / ext4 defaults 0 1\n")


@pytest.fixture(scope="module", params=["csum", "nocsum", "ext2"])
def small_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """The image bytes and the offsets worth corrupting: the non-zero bytes of its first MiB (superblock,
    descriptors, bitmaps, inodes, directories)."""
    imgs.require_tools()
    base = tmp_path_factory.mktemp("fuzz")
    _small_tree(base / "tree")
    mkfs, options = {
        "csum": ("mkfs.ext4", ("-O", "inline_data")),
        "nocsum": ("mkfs.ext4", ("-O", "^metadata_csum")),
        "ext2": ("mkfs.ext2", ()),
    }[request.param]
    data = imgs.make_ext(base / "tree", base / "small.raw", mkfs=mkfs, options=options, size_mb=4).read_bytes()
    return data, [i for i in range(min(METADATA_BYTES, len(data))) if data[i]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=8))
def test_corruption_gives_a_result_or_an_image_error(
    small_image: tuple[bytes, list[int]], tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    original, targets = small_image
    bad = imgs.fuzz_copy(tmp_path / "bad.raw", original)  # one copy per test run: an example puts its bytes back
    changed = imgs.flipped(original, targets, flips)
    imgs.write_at(bad, changed)
    try:
        with open_reader([(bad, "raw")], "fast", limits=LIMITS) as reader:
            result = inventory(reader, workers=2)
    except ImageError as err:
        assert "\n" not in str(err)
        return
    finally:
        imgs.write_at(bad, {at: original[at : at + 1] for at in changed})
    assert list(result.files) == sorted(result.files)
