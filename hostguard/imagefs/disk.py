"""Disk images as guest block devices, read with `os.pread` so any number of threads can read at once.

A `DiskImage` maps a guest byte range to segments of the image file: DATA (read at a host offset), ZERO
(unallocated or zero clusters) and, for qcow2 compressed clusters only, OPAQUE (decompressed through
dissect.hypervisor's qcow2 stream, one instance per thread). qcow2 headers are validated by
`hostguard.host.qcow2` first; a backing file, an external data file or encryption is refused: an inventory
describes exactly one self-contained image.
"""

from __future__ import annotations

import abc
import io
import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from hostguard.errors import FormatError, ImageError
from hostguard.host.digest import open_image
from hostguard.host.qcow2 import looks_like_qcow2, read_qcow2_header
from hostguard.imagefs import ImageSpec, UnsupportedLayout
from hostguard.record import Record

SEG_DATA, SEG_ZERO, SEG_OPAQUE = 0, 1, 2
# What one qcow2 cluster holds (Qcow2Image.clusters)
MAP_DATA, MAP_ZERO, MAP_UNALLOCATED, MAP_COMPRESSED = 0, 1, 2, 3
Segment = tuple[int, int, int]  # (kind, host offset for DATA / guest offset for OPAQUE / 0, length)

CHUNK = 1 << 20
ZEROS = memoryview(bytes(CHUNK))


def zero_chunks(length: int) -> Iterator[memoryview]:
    """`length` zero bytes (a hole, an unwritten extent) as pieces of `ZEROS`, at most `CHUNK` each."""
    done = 0
    while done < length:
        step = min(CHUNK, length - done)
        yield ZEROS[:step]
        done += step


QCOW2_MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
L2_CACHE_TABLES = 64
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1


def plan_segments(
    runs: Iterable[tuple[int | None, int]], to_segments: Callable[[int, int], Iterable[Segment]], limit: int
) -> list[Segment] | None:
    """A file's content runs (volume offset, or None for a hole; length) as image segments; None past `limit`."""
    out: list[Segment] = []
    for offset, length in runs:
        if offset is None:
            out.append((SEG_ZERO, 0, length))
        else:
            out.extend(to_segments(offset, length))
        if len(out) > limit:
            return None
    return out


def block_pairs(runs: Iterable[tuple[int | None, int]], block_size: int) -> list[int]:
    """A file's content runs (volume offset or None for a hole, length) as flat (first block, count) pairs,
    adjacent runs merged: the dependencies the incremental index keeps (`imagefs.indexing`)."""
    out: list[int] = []
    for offset, length in runs:
        if offset is None:
            continue
        start = offset // block_size
        count = -(-(offset + length) // block_size) - start
        if out and out[-2] + out[-1] == start:
            out[-1] += count
        else:
            out += [start, count]
    return out


class ContentPlan(Record):
    """Where one file's bytes are on a disk image, worked out before hashing (see `GuestFilesystemReader.
    content_plan`): reading it is a flat loop of preads, with no parser code per chunk."""

    image: DiskImage
    segments: list[Segment]

    def chunks(self) -> Iterator[bytes | memoryview]:
        return self.image.read_segments(self.segments)


class OffsetReader(io.RawIOBase):
    """A read-only, seekable file object with its own position over something read by offset (`read_at`);
    reads past `size` are short. What dissect's parsers read through."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._pos = 0

    @abc.abstractmethod  # for mypy: the C base class of io does not enforce it at run time
    def read_at(self, offset: int, length: int) -> bytes: ...

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), max(0, self._size - self._pos))
        if want == 0:
            return 0
        data = self.read_at(self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class PreadFile(OffsetReader):
    """Over a shared descriptor (pread: no shared file position)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(size)
        self._fd = fd

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)


class DiskImage:
    """One image file opened read-only (no symlink in the last component, must be a regular file). With `fd`,
    a descriptor the caller opened (and checked) that way: the image owns it from now on."""

    def __init__(self, spec: ImageSpec, index: int, *, fd: int | None = None) -> None:

        self.spec = spec
        self.index = index
        self.label = str(spec.path)
        self.fd = open_image(spec.path) if fd is None else fd
        self.file_size = os.fstat(self.fd).st_size
        self.size = self.file_size
        self._buffers = threading.local()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- reading -------------------------------------------------------------------------------------

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Segments covering [offset, offset+length) of the guest disk, adjacent DATA runs merged."""
        self._check_range(offset, length)
        yield (SEG_DATA, offset, length)

    def content_identity(self, offset: int, length: int) -> tuple[int, ...] | None:
        """A key that stays the same while the bytes [offset, offset+length) do, for caches of what was parsed
        from them; None when there is none (an image file on its own may be a domain's writable disk: see
        `ChainImage.content_identity`)."""
        return None

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(
                f"{self.label}: read of {length} bytes at offset {offset} is outside the disk ({self.size} bytes)"
            )

    def pread_host(self, host_offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, host_offset)
        except OSError as err:
            raise ImageError(f"{self.label}: cannot read at file offset {host_offset}: {err.strerror}") from None
        if len(data) != length:
            raise ImageError(f"{self.label}: file ends before offset {host_offset + length} (truncated image?)")
        return data

    def pread_view(self, host_offset: int, length: int) -> memoryview:
        """Like `pread_host` (length <= CHUNK), into this thread's buffer: valid until its next call."""
        view = memoryview(self._thread_buffer())[:length]
        try:
            got = os.preadv(self.fd, [view], host_offset)
        except OSError as err:
            raise ImageError(f"{self.label}: cannot read at file offset {host_offset}: {err.strerror}") from None
        if got != length:
            raise ImageError(f"{self.label}: file ends before offset {host_offset + length} (truncated image?)")
        return view

    def read_opaque(self, guest_offset: int, length: int) -> bytes:
        raise ImageError(f"{self.label}: no opaque data at offset {guest_offset}")

    def chunks(self, offset: int, length: int) -> Iterator[bytes | memoryview]:
        """The guest bytes [offset, offset+length) in pieces of at most CHUNK bytes. A piece may be this
        thread's reusable buffer: use it before asking for the next one."""
        return self.read_segments(self.segments(offset, length))

    def read_segments(self, segments: Iterable[Segment]) -> Iterator[bytes | memoryview]:
        """The bytes of `segments` (from `segments()`) in pieces of at most CHUNK bytes, as `chunks`."""
        # The hashing threads' inner loop: kept flat (one preadv into this thread's buffer per piece), as
        # every bytecode here is run with the GIL held while the other threads wait for it.
        view = memoryview(self._thread_buffer())
        fd = self.fd
        for kind, where, n in segments:
            done = 0
            while done < n:
                step = n - done if n - done < CHUNK else CHUNK
                if kind == SEG_DATA:
                    piece = view[:step]
                    try:
                        got = os.preadv(fd, [piece], where + done)
                    except OSError as err:
                        raise ImageError(
                            f"{self.label}: cannot read at file offset {where + done}: {err.strerror}"
                        ) from None
                    if got != step:
                        raise ImageError(f"{self.label}: file ends before offset {where + n} (truncated image?)")
                    yield piece
                elif kind == SEG_ZERO:
                    yield ZEROS[:step]
                else:
                    yield self.read_opaque(where + done, step)
                done += step

    def read_segments_by_method(self, segments: Iterable[Segment]) -> Iterator[bytes | memoryview]:
        """`read_segments` through `pread_view`/`read_opaque`, for subclasses whose segment offsets are not
        offsets in `self.fd`."""
        for kind, where, n in segments:
            done = 0
            while done < n:
                step = min(CHUNK, n - done)
                if kind == SEG_DATA:
                    yield self.pread_view(where + done, step)
                elif kind == SEG_ZERO:
                    yield ZEROS[:step]
                else:
                    yield self.read_opaque(where + done, step)
                done += step

    def _thread_buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = bytearray(CHUNK)
        return buf

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(bytes(c) for c in self.chunks(offset, length))


class RawImage(DiskImage):
    pass


class Qcow2Image(DiskImage):
    """qcow2 v2/v3 without external data file, encryption or extended L2 entries. A backing file is refused
    unless `layer=True`: then this is one layer of a chain (`imagefs.chain`), whose unallocated clusters
    the chain reads from the layer below; on its own such a layer reads them as zeros."""

    def __init__(self, spec: ImageSpec, index: int, *, fd: int | None = None, layer: bool = False) -> None:
        super().__init__(spec, index, fd=fd)
        self.layer = layer
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:

        try:
            header = read_qcow2_header(self.fd, name=self.label)
        except FormatError as err:
            raise ImageError(err.message) from None
        self.header = header
        if header.backing_file is not None and not self.layer:
            raise ImageError(f"{self.label}: qcow2 has a backing file ({header.backing_file[:200]}): flatten it first")
        if header.external_data_file:
            raise ImageError(f"{self.label}: qcow2 keeps its data in an external file: not supported")
        if header.encrypted:
            raise ImageError(f"{self.label}: qcow2 is encrypted: not supported")
        if header.incompatible_features & (1 << 4):
            raise UnsupportedLayout(f"{self.label}: qcow2 with extended L2 entries")
        self.compression = header.compression
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.size = header.virtual_size
        raw = self.pread_host(0, 48)
        l1_size, l1_offset = struct.unpack_from(">IQ", raw, 36)
        self.l2_entries = self.cluster_size // 8
        span = self.cluster_size * self.l2_entries
        needed = -(-self.size // span)
        if l1_size < needed:
            raise ImageError(f"{self.label}: offset 36: qcow2 L1 table has {l1_size} entries, the disk needs {needed}")
        if l1_size * 8 > QCOW2_MAX_L1_BYTES or l1_offset + l1_size * 8 > self.file_size:
            raise ImageError(f"{self.label}: offset 40: qcow2 L1 table ({l1_size} entries) is too large or truncated")
        self.l1 = struct.unpack(f">{l1_size}Q", self.pread_host(l1_offset, l1_size * 8)) if l1_size else ()
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _l2(self, l2_offset: int) -> array[int]:
        with self._lock:
            table = self._l2_cache.get(l2_offset)
            if table is not None:
                self._l2_cache.move_to_end(l2_offset)
                return table
        if l2_offset % self.cluster_size or l2_offset + self.cluster_size > self.file_size:
            raise ImageError(f"{self.label}: qcow2 L2 table offset {l2_offset} is misaligned or beyond the file")
        table = array("Q", self.pread_host(l2_offset, self.cluster_size))  # 8 bytes per entry, not a PyLong
        if sys.byteorder == "little":
            table.byteswap()  # qcow2 is big endian
        with self._lock:
            self._l2_cache[l2_offset] = table
            while len(self._l2_cache) > L2_CACHE_TABLES:
                self._l2_cache.popitem(last=False)
        return table

    def clusters(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(state, host offset for MAP_DATA, length) per cluster piece of [offset, offset+length)."""
        self._check_range(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            cluster, within = divmod(pos, self.cluster_size)
            n = min(self.cluster_size - within, end - pos)
            l1_index, l2_index = divmod(cluster, self.l2_entries)
            l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
            if not l2_offset:
                yield (MAP_UNALLOCATED, 0, n)
            else:
                entry = self._l2(l2_offset)[l2_index]
                if entry & QCOW_OFLAG_COMPRESSED:
                    yield (MAP_COMPRESSED, 0, n)
                else:
                    host = entry & L2E_OFFSET_MASK
                    if entry & QCOW_OFLAG_ZERO:
                        yield (MAP_ZERO, 0, n)
                    elif not host:
                        yield (MAP_UNALLOCATED, 0, n)
                    else:
                        if host % self.cluster_size:
                            raise ImageError(f"{self.label}: qcow2 cluster offset {host} is misaligned")
                        yield (MAP_DATA, host + within, n)
            pos += n

    def defines_any(self, offset: int, length: int) -> bool:
        """Whether this layer defines any byte of [offset, offset+length) (else a chain reads the layer below);
        an L1 entry without an L2 table answers for its whole span at once."""
        self._check_range(offset, length)
        span = self.cluster_size * self.l2_entries
        pos, end = offset, offset + length
        while pos < end:
            step = min(end, (pos // span + 1) * span) - pos
            if self.l1[pos // span] & L1E_OFFSET_MASK and any(
                state != MAP_UNALLOCATED for state, _, _ in self.clusters(pos, step)
            ):
                return True
            pos += step
        return False

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        pending: Segment | None = None
        pos = offset
        for state, host, n in self.clusters(offset, length):
            seg: Segment
            if state == MAP_DATA:
                seg = (SEG_DATA, host, n)
            elif state == MAP_COMPRESSED:
                seg = (SEG_OPAQUE, pos, n)
            else:
                seg = (SEG_ZERO, 0, n)
            pos += n
            if pending is not None:
                kind, where, size = pending
                # Merge contiguous clusters, but only up to CHUNK: a reader thread should not run Python
                # for long between its GIL-free reads (the other hashing threads would wait for the GIL).
                if kind == seg[0] and (kind == SEG_ZERO or where + size == seg[1]) and size < CHUNK:
                    pending = (kind, where, size + n)
                    continue
                yield pending
            pending = seg
        if pending is not None:
            yield pending

    def allocated(self) -> list[tuple[int, int]]:
        """Guest byte ranges (offset, length), merged and sorted, whose content this layer defines: data,
        compressed and zero clusters. Everything else reads from the layer below."""
        out: list[tuple[int, int]] = []
        span = self.cluster_size * self.l2_entries
        for l1_index, l1e in enumerate(self.l1):
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset or l1_index * span >= self.size:
                continue
            table = self._l2(l2_offset)
            base = l1_index * span
            for l2_index, entry in enumerate(table):
                if entry == 0:
                    continue
                start = base + l2_index * self.cluster_size
                if start >= self.size:
                    break
                n = min(self.cluster_size, self.size - start)
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((start, n))
        return out

    def read_opaque(self, guest_offset: int, length: int) -> bytes:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._dissect_stream()
        try:
            stream.seek(guest_offset)
            data: bytes = stream.read(length)
        except (OSError, EOFError, ValueError, RuntimeError, IndexError) as err:
            raise ImageError(
                f"{self.label}: cannot decompress qcow2 data at disk offset {guest_offset}: {err}"
            ) from None
        if len(data) != length:
            raise ImageError(f"{self.label}: short compressed qcow2 cluster at disk offset {guest_offset}")
        return data

    def _dissect_stream(self) -> Any:
        from dissect.hypervisor.disk.qcow2 import QCow2

        try:
            # A chain layer's stream is asked only for its own compressed clusters: never for its backing file.
            backing = io.BytesIO() if self.header.backing_file is not None else None
            return QCow2(PreadFile(self.fd, self.file_size), backing_file=backing).open()
        except RuntimeError as err:  # e.g. zstd support missing
            raise UnsupportedLayout(f"{self.label}: compressed qcow2: {err}") from None


def check_image(spec: ImageSpec) -> int:
    """Open and validate an image for a reader that passes it on to QEMU (libguestfs): the same refusals
    as `open_disk` except what only the fast reader lacks. Returns the open descriptor."""
    disk = RawImage(spec, 0)
    try:
        head = disk.pread_host(0, min(4, disk.file_size))

        if spec.format == "raw":
            if looks_like_qcow2(head):
                raise ImageError(f"{spec.path}: given as raw but starts with the qcow2 magic: refusing to guess")
        else:
            try:
                header = read_qcow2_header(disk.fd, name=disk.label)
            except FormatError as err:
                raise ImageError(err.message) from None
            if header.backing_file is not None or header.external_data_file or header.encrypted:
                raise ImageError(f"{spec.path}: qcow2 with a backing file, external data file or encryption")
        fd = os.dup(disk.fd)
    finally:
        disk.close()
    return fd


def open_disk(spec: ImageSpec, index: int) -> DiskImage:
    if spec.format == "qcow2":
        return Qcow2Image(spec, index)
    img = RawImage(spec, index)

    if looks_like_qcow2(img.pread_host(0, min(4, img.file_size))):
        img.close()
        raise ImageError(f"{spec.path}: given as raw but starts with the qcow2 magic: refusing to guess")
    return img


def content_digest(spec: ImageSpec) -> tuple[str, int]:
    """(sha256, size) of the guest-visible disk: the bytes `qemu-img convert -O raw` writes for this image
    (for qcow2, the virtual disk with unallocated and zero clusters as zeros; for raw, the file)."""
    import hashlib

    disk = open_disk(spec, 0)
    try:
        h = hashlib.sha256()
        for piece in disk.chunks(0, disk.size):
            h.update(piece)
        return h.hexdigest(), disk.size
    finally:
        disk.close()
