"""A qcow2 backing chain read as one guest disk: overlays over a signed base, each layer opened by us.

`open_chain(layers)` takes the chain as the pre-boot record names it (top first: path, format, device and
inode), never as the qcow2 headers alone say it: every layer is opened with O_NOFOLLOW, must be the same
file (device, inode) that the hook verified, and its header must name exactly the next recorded layer as
its backing file, with the recorded format; the last layer has no backing file. Any disagreement is a
`ChainMismatch`, which the daemon reports as a finding (QEMU may be reading something else).

`ChainImage` reads like any `DiskImage`: a cluster a layer does not allocate comes from the layer below (zeros
past the end of a shorter backing file, as QEMU reads them). Segments carry the layer in the top byte of
their host offset (`_LAYER_SHIFT`), so extents of different layers never merge and `pread_view` finds the
right file. `changed()` lists the guest ranges any overlay allocates: everything else reads as the base.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from hostguard.errors import FormatError, ImageError
from hostguard.host.digest import open_image
from hostguard.host.qcow2 import looks_like_qcow2, resolve_backing_path
from hostguard.imagefs import ImageSpec
from hostguard.imagefs.disk import (
    CHUNK,
    MAP_COMPRESSED,
    MAP_DATA,
    MAP_ZERO,
    SEG_DATA,
    SEG_OPAQUE,
    SEG_ZERO,
    DiskImage,
    Qcow2Image,
    RawImage,
    Segment,
)
from hostguard.record import Record

_LAYER_SHIFT = 56
_OFFSET_MASK = (1 << _LAYER_SHIFT) - 1
MAX_LAYERS = 8


class ChainMismatch(ImageError):
    """A layer is not the file, or the chain not the chain, that the pre-boot check verified."""


class LayerRecord(Record):
    """One layer as the pre-boot record names it."""

    path: Path
    format: str  # "raw" | "qcow2"
    dev: int
    ino: int


def _open_layer(rec: LayerRecord, index: int, *, top: bool) -> DiskImage:

    fd = open_image(rec.path)  # O_NOFOLLOW, regular file
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
            raise ChainMismatch(
                f"{rec.path} is not the file the pre-boot check verified "
                f"(device/inode {st.st_dev}/{st.st_ino}, recorded {rec.dev}/{rec.ino})"
            )
        head = os.pread(fd, 4, 0)
    except BaseException:
        os.close(fd)
        raise
    spec = ImageSpec(rec.path, rec.format)
    if rec.format == "raw":
        if looks_like_qcow2(head):
            os.close(fd)
            raise ChainMismatch(f"{rec.path}: recorded as raw but starts with the qcow2 magic")
        return RawImage(spec, index, fd=fd)
    if rec.format != "qcow2":
        os.close(fd)
        raise ChainMismatch(f"{rec.path}: recorded format {rec.format!r} is not raw or qcow2")
    image = Qcow2Image(spec, index, fd=fd, layer=True)
    if image.header.corrupt:
        image.close()
        raise ImageError(f"{rec.path}: QEMU marked this qcow2 corrupt")
    if image.header.dirty and not top:
        image.close()
        raise ChainMismatch(f"{rec.path}: backing file is marked dirty: it was opened for writing")
    return image


class ChainImage(DiskImage):
    """The guest disk seen through a chain of layers (top first; the last one is the base)."""

    def __init__(self, layers: Sequence[DiskImage], index: int, *, read_only_base: bool = False) -> None:
        # Not DiskImage.__init__: the chain owns no descriptor of its own.
        if not layers:
            raise ImageError("an image chain needs at least one layer")
        self.layers = list(layers)
        # A backing file is opened read-only by QEMU: nobody writes it while the domain runs.
        self.read_only_base = read_only_base or len(self.layers) > 1
        top = self.layers[0]
        self.spec = top.spec
        self.index = index
        self.label = top.label
        self.fd = -1
        self.file_size = top.file_size
        self.size = top.size

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    @property
    def base(self) -> DiskImage:
        return self.layers[-1]

    def changed(self) -> list[tuple[int, int]]:
        """Merged, sorted guest byte ranges that some overlay (any layer but the base) defines."""
        ranges: list[tuple[int, int]] = []
        for layer in self.layers[:-1]:
            assert isinstance(layer, Qcow2Image)
            ranges.extend(layer.allocated())
        # Past the end of a shorter layer the view reads zeros, whatever the base holds there (or does not).
        shortest = min(layer.size for layer in self.layers)
        if shortest < self.size:
            ranges.append((shortest, self.size - shortest))
        return merge_ranges(ranges)

    def content_identity(self, offset: int, length: int) -> tuple[int, ...] | None:
        """The base file's identity when no overlay defines any byte of the range (the view reads the base
        there) and the base is a file nobody writes (a domain's writable disk changes under any key)."""
        if not self.read_only_base:
            return None
        for layer in self.layers[:-1]:
            if offset + length > layer.size:
                return None
            assert isinstance(layer, Qcow2Image)
            if layer.defines_any(offset, length):
                return None
        self._check_range(offset, length)
        st = os.fstat(self.base.fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    # --- reading -------------------------------------------------------------------------------------

    def _layer_pieces(self, depth: int, offset: int, length: int) -> Iterator[Segment]:
        """Unmerged segments of [offset, offset+length) as layer `depth` and those below define it."""
        layer = self.layers[depth]
        avail = max(0, min(length, layer.size - offset))
        tail = (offset + avail, length - avail) if avail < length else None
        if avail:
            tag = depth << _LAYER_SHIFT
            if isinstance(layer, Qcow2Image):
                pos = offset
                for state, host, n in layer.clusters(offset, avail):
                    if state == MAP_DATA:
                        yield (SEG_DATA, tag | host, n)
                    elif state == MAP_ZERO:
                        yield (SEG_ZERO, 0, n)
                    elif state == MAP_COMPRESSED:
                        yield (SEG_OPAQUE, tag | pos, n)
                    elif depth + 1 < len(self.layers):
                        yield from self._layer_pieces(depth + 1, pos, n)
                    else:
                        yield (SEG_ZERO, 0, n)
                    pos += n
            else:
                yield (SEG_DATA, tag | offset, avail)
        if tail is not None:
            yield (SEG_ZERO, 0, tail[1])  # past the end of a shorter backing file: zeros

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        self._check_range(offset, length)
        pending: Segment | None = None
        for seg in self._layer_pieces(0, offset, length):
            if pending is not None:
                kind, where, size = pending
                # As Qcow2Image.segments: merge contiguous pieces of one layer, up to CHUNK.
                if kind == seg[0] and (kind == SEG_ZERO or where + size == seg[1]) and size < CHUNK:
                    pending = (kind, where, size + seg[2])
                    continue
                yield pending
            pending = seg
        if pending is not None:
            yield pending

    def _layer_of(self, where: int) -> tuple[DiskImage, int]:
        depth = where >> _LAYER_SHIFT
        if depth >= len(self.layers):
            raise ImageError(f"{self.label}: bad chain offset {where:#x}")
        return self.layers[depth], where & _OFFSET_MASK

    def pread_host(self, host_offset: int, length: int) -> bytes:
        layer, offset = self._layer_of(host_offset)
        return layer.pread_host(offset, length)

    def pread_view(self, host_offset: int, length: int) -> memoryview:
        layer, offset = self._layer_of(host_offset)
        return layer.pread_view(offset, length)

    # Segments of a chain name their layer in the offset's high bits: each piece is read through it.
    read_segments = DiskImage.read_segments_by_method

    def read_opaque(self, guest_offset: int, length: int) -> bytes:
        layer, offset = self._layer_of(guest_offset)
        return layer.read_opaque(offset, length)


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, n in sorted(r for r in ranges if r[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            last_start, last_n = out[-1]
            out[-1] = (last_start, max(last_n, start + n - last_start))
        else:
            out.append((start, n))
    return out


def open_chain(layers: Sequence[LayerRecord], index: int = 0, *, read_only_base: bool = False) -> ChainImage:
    """Open and check the recorded chain (top first). Raises ChainMismatch, ImageError (UnsupportedLayout for
    qcow2 features the fast reader lacks). `read_only_base`: the caller knows the base is a file nobody writes
    (a verified backing file) even when it is the only layer opened."""

    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ChainMismatch(f"a recorded chain of {len(layers)} layers (1..{MAX_LAYERS} expected)")
    opened: list[DiskImage] = []
    try:
        for depth, rec in enumerate(layers):
            image = _open_layer(rec, index, top=depth == 0)
            opened.append(image)
            below = layers[depth + 1] if depth + 1 < len(layers) else None
            backing = image.header.backing_file if isinstance(image, Qcow2Image) else None
            if below is None:
                if backing is not None:
                    raise ChainMismatch(f"{rec.path} names backing file {backing[:200]}, the record ends here")
                continue
            if backing is None:
                raise ChainMismatch(f"{rec.path} has no backing file, the record names {below.path}")
            assert isinstance(image, Qcow2Image)
            try:
                named = resolve_backing_path(rec.path, backing)
            except FormatError as err:
                raise ChainMismatch(err.message) from None
            if named != below.path or image.header.backing_format != below.format:
                raise ChainMismatch(
                    f"{rec.path} names backing file {named} ({image.header.backing_format}), "
                    f"the record {below.path} ({below.format})"
                )
        return ChainImage(opened, index, read_only_base=read_only_base)
    except BaseException:
        for image in opened:
            image.close()
        raise
