"""What vouches for a pulled layer (hostguard.library.ocilayer, ADR 0034): the signed layout while every byte
follows it, else the layer digest, caught up over what was already received when the departure comes late."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hostguard.errors import DigestMismatchError, FormatError
from hostguard.library import ocilayer, ociunpack

KERNEL, INITRD, DISK = b"k" * 700, b"i" * 1024, bytes(range(256)) * 40 + b"tail"
FILES = [("boot/vmlinuz", KERNEL), ("boot/initrd", INITRD), ("disk/x.img", DISK)]


def _layer(files: list[tuple[str, bytes]], tmp_path: Path) -> bytes:
    paths = []
    for name, data in files:
        path = tmp_path / name.replace("/", "_")
        path.write_bytes(data)
        paths.append((name, path))
    writer = ocilayer.LayerWriter(paths)
    layer = b"".join(writer.chunks())
    assert writer.digest() == f"sha256:{hashlib.sha256(layer).hexdigest()}"
    return layer


def _pull(tmp_path: Path, layer: bytes, layout: ocilayer.Layout | None, chunk: int, digest: str) -> str:
    """Feed `layer` as a download does; return how it was vouched for (or raise as the pull would)."""
    work = tmp_path / f"work-{chunk}"
    work.mkdir(parents=True)
    unpacker = ociunpack.Unpacker(work)
    check = ocilayer.LayerCheck(layout, lambda: list(unpacker.files.values()))
    try:
        for i in range(0, len(layer), chunk):
            part = memoryview(layer[i : i + chunk])
            check.update(part)
            unpacker.feed(part)
        unpacker.close()
        how = check.verify(digest)
        unpacker.finish()
        return how
    finally:
        check.close()
        unpacker.close()


def test_push_writes_exactly_the_layout_the_pull_expects(tmp_path: Path) -> None:
    layer = _layer(FILES, tmp_path)
    layout = ocilayer.layer_layout([(n, len(d)) for n, d in FILES])
    assert ocilayer.layout_size(layout) == len(layer)
    data = iter(d for _, d in FILES)
    assert b"".join(s if isinstance(s, bytes) else next(data) for s in layout) == layer
    digest = f"sha256:{hashlib.sha256(layer).hexdigest()}"
    for chunk in (1, 511, 4096, len(layer)):
        assert _pull(tmp_path, layer, layout, chunk, digest) == "signed layout"
        assert _pull(tmp_path / "by-digest", layer, None, chunk, digest) == "layer digest"


def _fixed_positions(layout: ocilayer.Layout) -> list[int]:
    positions: list[int] = []
    at = 0
    for segment in layout:
        if isinstance(segment, bytes):
            positions += range(at, at + len(segment))
        at += ocilayer.layout_size([segment])
    return positions


@pytest.mark.parametrize("chunk", [1, 100, 4096, 1 << 20])
def test_a_byte_off_the_layout_anywhere_is_caught_by_the_caught_up_layer_digest(tmp_path: Path, chunk: int) -> None:
    """Every fixed byte of the layout (headers, padding, end blocks), altered in turn: either the tar reader
    refuses the layer, or the check falls back to the layer digest, which then equals the digest of the bytes
    as served (so the registry's digest of the original refuses them). The files' own bytes are the signed
    digests' business (test_oci_client)."""
    layer = _layer(FILES, tmp_path)
    layout = ocilayer.layer_layout([(n, len(d)) for n, d in FILES])
    pushed = f"sha256:{hashlib.sha256(layer).hexdigest()}"
    positions = _fixed_positions(layout)
    assert len(positions) > 4000
    outcomes = {"refused by the tar reader": 0, "layer digest": 0}
    for n, pos in enumerate([*positions[:: 13 if chunk > 1 else 211], positions[-1]]):
        served = bytearray(layer)
        served[pos] ^= 0x20
        case = tmp_path / str(n)
        try:
            with pytest.raises(DigestMismatchError):
                _pull(case, bytes(served), layout, chunk, pushed)
        except FormatError:
            outcomes["refused by the tar reader"] += 1
            continue
        own = f"sha256:{hashlib.sha256(served).hexdigest()}"
        assert _pull(case / "again", bytes(served), layout, chunk, own) == "layer digest", pos
        outcomes["layer digest"] += 1
    assert all(outcomes.values()), outcomes  # both kinds of departure were met


def test_bytes_past_the_layout_or_short_of_it_are_not_vouched_for(tmp_path: Path) -> None:
    layer = _layer(FILES, tmp_path)
    layout = ocilayer.layer_layout([(n, len(d)) for n, d in FILES])
    pushed = f"sha256:{hashlib.sha256(layer).hexdigest()}"
    with pytest.raises(DigestMismatchError):  # one byte short: caught up, and not the layer's digest
        _pull(tmp_path / "short", layer[:-1], layout, 4096, pushed)
    longer = layer + b"\0" * 512
    with pytest.raises((DigestMismatchError, FormatError)):
        _pull(tmp_path / "long", longer, layout, 4096, pushed)
    own = f"sha256:{hashlib.sha256(longer).hexdigest()}"
    assert _pull(tmp_path / "long-own", longer, layout, 4096, own) == "layer digest"  # a longer layer: by its digest
