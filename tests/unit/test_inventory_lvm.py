"""The fast reader on LVM2: a RHEL-style disk (GPT, /boot ext4, an LVM PV holding an XFS root in two
segments and an ext4 /home, placed through the guest's fstab by /dev/mapper names), checked against the
source trees; a PV whose metadata cannot be read is an error naming it (never a partial inventory)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs import Limits
from hostguard.imagefs.inventory import InventoryResult, inventory
from hostguard.imagefs.lvm import MDA_HEADER_SIZE, lvm_crc
from hostguard.imagefs.readers import open_reader
from hostguard.signed.manifest import FileEntry
from tests.unit import inventory_images as imgs


def run(path: Path, reader: str = "fast", *, limits: Limits | None = None) -> InventoryResult:
    kwargs = {"limits": limits} if limits is not None else {}
    with open_reader([(path, "raw")], reader, **kwargs) as r:
        return inventory(r, workers=2)


@pytest.fixture(scope="module")
def rhel_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FileEntry]]:
    return imgs.make_rhel_like(tmp_path_factory.mktemp("lvm"), f"hgt{os.getpid()}")


def test_xfs_root_and_ext4_home_on_lvm_match_the_host_view(rhel_like: tuple[Path, dict[str, FileEntry]]) -> None:
    image, expected = rhel_like
    vg = f"hgt{os.getpid()}"
    with open_reader([(image, "raw")], "auto") as reader:
        assert reader.name == "fast"
        fss = {f.locator: f.fstype for f in reader.filesystems()}
        result = inventory(reader, workers=2)
    assert fss == {"disk0p1": "ext4", f"lvm:{vg}:home": "ext4", f"lvm:{vg}:root": "xfs"}
    assert result.layout == {f"lvm:{vg}:root": "/", "disk0p1": "/boot", f"lvm:{vg}:home": "/home"}
    assert {f.path: f for f in result.files} == expected


def _metadata_text_location(image: Path) -> tuple[int, int, int]:
    """(image offset of the mda header, of the metadata text, text length) of the PV, from its label."""
    with image.open("rb") as fh:
        fh.seek(imgs.PV_START)
        head = fh.read(4096)
    label = next(s * 512 for s in range(4) if head[s * 512 : s * 512 + 8] == b"LABELONE")
    pvh = label + struct.unpack_from("<I", head, label + 20)[0]
    pos = pvh + 40
    while struct.unpack_from("<QQ", head, pos) != (0, 0):  # data areas
        pos += 16
    pos += 16
    mda_offset = struct.unpack_from("<Q", head, pos)[0]
    with image.open("rb") as fh:
        fh.seek(imgs.PV_START + mda_offset)
        mda = fh.read(MDA_HEADER_SIZE)
    text_offset, text_size = struct.unpack_from("<QQ", mda, 40)
    return imgs.PV_START + mda_offset, imgs.PV_START + mda_offset + text_offset, text_size


def test_attack_corrupt_lvm_metadata_is_an_error_not_a_partial_inventory(
    rhel_like: tuple[Path, dict[str, FileEntry]], tmp_path: Path
) -> None:
    """Issue 19: corrupt LVM metadata behind an intact label gave exit 0 and only the /boot files."""
    image, _ = rhel_like
    bad = tmp_path / "bad.raw"
    imgs.sparse_copy(image, bad)
    _mda, text, _size = _metadata_text_location(bad)
    with bad.open("r+b") as fh:
        fh.seek(text + 10)
        fh.write(b"#")
    for reader in ("fast", "auto"):
        with pytest.raises(ImageError, match=r"\(partition 2\): LVM2 physical volume: metadata checksum mismatch"):
            run(bad, reader)


# --- fuzz: hostile metadata text with a valid checksum --------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, 1 << 20), st.sampled_from([b"", b"{", b"}", b"[", b"]", b"=", b'"', b"\n", b"9" * 30])
        ),
        min_size=1,
        max_size=6,
    )
)
def test_hostile_lvm_metadata_gives_a_result_or_an_image_error(
    rhel_like: tuple[Path, dict[str, FileEntry]], edits: list[tuple[int, bytes]]
) -> None:
    """Mutated metadata text, re-checksummed as an attacker would: an inventory or one clean ImageError."""
    image, _ = rhel_like
    mda, text_at, size = _metadata_text_location(image)
    with image.open("rb") as fh:
        fh.seek(text_at)
        text = bytearray(fh.read(size))
    for pos, insert in edits:
        p = pos % len(text)
        text[p : p + 1] = insert
    with image.open("rb") as fh:  # mutated in place (a 600 MiB copy per example is slow), restored after
        fh.seek(mda)
        saved_header = fh.read(MDA_HEADER_SIZE)
        fh.seek(text_at)
        saved_text = fh.read(max(size, len(text)))
    try:
        with image.open("r+b") as fh:
            fh.seek(text_at)
            fh.write(bytes(text))
            header = bytearray(saved_header)
            offset, _old, _crc, flags = struct.unpack_from("<QQII", header, 40)
            struct.pack_into("<QQII", header, 40, offset, len(text), lvm_crc(bytes(text)), flags)
            struct.pack_into("<I", header, 0, lvm_crc(bytes(header[4:])))
            fh.seek(mda)
            fh.write(header)
        try:
            result = run(image, limits=Limits(max_file_bytes=64 << 20))
        except ImageError as err:
            assert "\n" not in str(err)
            return
        assert list(result.files) == sorted(result.files)
    finally:
        with image.open("r+b") as fh:
            fh.seek(text_at)
            fh.write(saved_text)
            fh.seek(mda)
            fh.write(saved_header)
