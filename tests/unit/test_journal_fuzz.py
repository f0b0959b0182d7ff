"""A hostile journal: random corruption of the journal superblock and the log (headers, tags, revoke records,
commit blocks, checksum tails) must give a replayed view or one clean `ImageError` (`UnsupportedLayout`
included) — never another exception, never a hang."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs.journal import INCOMPAT_64BIT, INCOMPAT_CSUM_V3
from tests.unit.inventory_images import flipped, fuzz_copy, make_ext, require_tools, write_at
from tests.unit.jbd2_images import MAGIC_BYTES, LogWriter, Txn, open_fs


@pytest.fixture(scope="module", params=[INCOMPAT_64BIT | INCOMPAT_CSUM_V3, 0], ids=["csum-v3-64bit", "plain-32bit"])
def dirty(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """A dirty image and the offsets worth corrupting: the headers, first tags and tails of every block the
    writer put in the journal."""
    require_tools()
    d = tmp_path_factory.mktemp("jfuzz")
    (d / "tree/bin").mkdir(parents=True)
    shutil.copyfile("/bin/busybox", d / "tree/bin/busybox")
    options = ("-b", "4096") if request.param else ("-b", "4096", "-O", "^64bit,^metadata_csum")
    image = make_ext(d / "tree", d / "dirty.raw", options=options, size_mb=16)
    txns = [
        Txn({300: os.urandom(4096), 301: MAGIC_BYTES + os.urandom(4092)}, commit_time=10),
        Txn({302: os.urandom(4096)}, revokes=[300, 7], commit_time=11),
        Txn({2: os.urandom(4096)}, commit_time=12),
        Txn({303: os.urandom(4096)}, commit=False),
    ]
    writer = LogWriter(image, request.param)
    writer.write(txns, start=1, sequence=5)
    assert open_fs(image).remap  # the uncorrupted journal replays
    targets = []
    for n, _data in writer.writes:
        base = writer.journal.where(n)
        targets += [*range(base, base + 128), *range(base + 4088, base + 4096)]
    return image.read_bytes(), targets


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=6))
def test_journal_corruption_gives_a_view_or_an_image_error(
    dirty: tuple[bytes, list[int]], tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    original, targets = dirty
    image = fuzz_copy(tmp_path / "fuzzed.raw", original)  # one copy per test run: an example puts its bytes back
    changed = flipped(original, targets, flips)
    write_at(image, changed)
    try:
        fs = open_fs(image)
        for block in fs.remap:
            fs.read(block * fs.block_size, fs.block_size)
    except ImageError:
        pass
    finally:
        write_at(image, {at: original[at : at + 1] for at in changed})
