"""qcow2 backing chains read by hostguard (imagefs.chain) agree with QEMU's own reading (`qemu-img convert`,
`qemu-img map`), and a chain that is not the recorded one is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs.chain import ChainMismatch, LayerRecord, merge_ranges, open_chain
from tests.unit.diskcheck_images import layer
from tests.unit.inventory_images import require_tools, run

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools()


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    run("qemu-io", "-f", fmt, *args, image)


def create(path: Path, size: str | None = None, backing: Path | None = None, backing_fmt: str = "qcow2") -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-F", backing_fmt, "-b", str(backing)]
    run(*args, path, *([size] if size else []))
    return path


def flattened(top: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, out)
    return out.read_bytes()


def qemu_changed(top: Path, layers: int) -> list[tuple[int, int]]:
    """Guest ranges QEMU says come from a layer above the base."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(top)], capture_output=True, check=True, text=True
    ).stdout
    return merge_ranges([(m["start"], m["length"]) for m in json.loads(out) if m["depth"] < layers - 1])


def read_all(records: list[LayerRecord]) -> bytes:
    chain = open_chain(records)
    try:
        return b"".join(bytes(c) for c in chain.chunks(0, chain.size))
    finally:
        chain.close()


def random_writes(image: Path, size: int, seed: int, count: int = 40) -> None:
    rng = random.Random(seed)
    commands = []
    for _ in range(count):
        off = rng.randrange(0, size // 512) * 512
        n = min(rng.choice([512, 4096, 65536, 200_000 // 512 * 512]), size - off)
        kind = rng.random()
        if kind < 0.6:
            commands.append(f"write -q -P {rng.randrange(1, 255)} {off} {n}")
        elif kind < 0.8:
            commands.append(f"write -q -z {off} {n}")
        else:
            commands.append(f"discard -q {off} {n}")
    qemu_io(image, *commands)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_layer_chain_reads_as_qemu_reads_it(tmp_path: Path, seed: int) -> None:
    base = create(tmp_path / "base.qcow2", "8M")
    random_writes(base, 8 * MIB, seed)
    top = create(tmp_path / "top.qcow2", backing=base)
    random_writes(top, 8 * MIB, seed + 100)
    records = [layer(top, "qcow2"), layer(base, "qcow2")]
    assert read_all(records) == flattened(top, tmp_path / "flat.raw")
    chain = open_chain(records)
    try:
        assert chain.changed() == qemu_changed(top, 2)
        assert chain.changed()  # the test wrote something
    finally:
        chain.close()


def test_three_layers_raw_base_compressed_clusters_and_a_shorter_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(3 * MIB))
    mid = create(tmp_path / "mid.qcow2", "6M", backing=base, backing_fmt="raw")
    qemu_io(mid, "write -q -c -P 7 0 65536", "write -q -P 9 2097152 65536", "write -q -z 65536 65536")
    top = create(tmp_path / "top.qcow2", "8M", backing=mid)
    qemu_io(top, "write -q -P 3 4194304 4096", "write -q -P 4 6291456 65536")
    records = [layer(top, "qcow2"), layer(mid, "qcow2"), layer(base, "raw")]
    data = read_all(records)
    assert len(data) == 8 * MIB
    assert data == flattened(top, tmp_path / "flat.raw")
    chain = open_chain(records)
    try:
        assert chain.changed() == qemu_changed(top, 3)
    finally:
        chain.close()


def test_an_overlay_that_allocates_nothing_changes_nothing(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -q -P 1 0 1M")
    top = create(tmp_path / "top.qcow2", backing=base)
    chain = open_chain([layer(top, "qcow2"), layer(base, "qcow2")])
    try:
        assert chain.changed() == []
    finally:
        chain.close()


# --- the chain must be the recorded one -----------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = create(tmp_path / "base.qcow2", "4M")
    top = create(tmp_path / "top.qcow2", backing=base)
    return top, base


def test_a_layer_replaced_by_another_file_is_refused(pair: tuple[Path, Path]) -> None:
    top, base = pair
    records = [layer(top, "qcow2"), layer(base, "qcow2")]
    replacement = top.with_name("other.qcow2")
    create(replacement, backing=base)
    os.replace(replacement, top)  # same path, another inode
    with pytest.raises(ChainMismatch, match="not the file the pre-boot check verified"):
        open_chain(records)


def test_a_symlink_in_place_of_a_layer_is_refused(pair: tuple[Path, Path]) -> None:
    top, base = pair
    link = top.with_name("link.qcow2")
    link.symlink_to(top)
    st = os.stat(top)
    with pytest.raises(ImageError, match="symlink"):
        open_chain([LayerRecord(link, "qcow2", st.st_dev, st.st_ino), layer(base, "qcow2")])


def test_the_header_must_name_the_recorded_backing_file(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    top, base = pair
    other = create(tmp_path / "other-base.qcow2", "4M")
    with pytest.raises(ChainMismatch, match="names backing file"):
        open_chain([layer(top, "qcow2"), layer(other, "qcow2")])
    # the record ends before the header's chain does
    with pytest.raises(ChainMismatch, match="the record ends here"):
        open_chain([layer(top, "qcow2")])
    # the record goes on below a layer without a backing file
    with pytest.raises(ChainMismatch, match="has no backing file"):
        open_chain([layer(base, "qcow2"), layer(other, "qcow2")])


def test_the_recorded_format_must_agree(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    top, base = pair
    with pytest.raises(ChainMismatch, match="names backing file"):
        open_chain([layer(top, "qcow2"), layer(base, "raw")])
    with pytest.raises(ChainMismatch, match="recorded as raw"):
        open_chain([layer(base, "raw")])


def test_a_dirty_backing_file_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    top, base = pair
    with open(base, "r+b") as fh:  # set the "dirty" incompatible feature bit, as an unclean writer leaves it
        fh.seek(72)
        bits = int.from_bytes(fh.read(8), "big")
        fh.seek(72)
        fh.write((bits | 1).to_bytes(8, "big"))
    with pytest.raises(ChainMismatch, match="dirty"):
        open_chain([layer(top, "qcow2"), layer(base, "qcow2")])
