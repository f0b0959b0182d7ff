"""The layer of a library image on an OCI registry: the tar `push` writes, and what vouches for a pulled one.

`push` writes a layer that is a function of the signed files alone: fixed tar headers (PAX format, mtime 0,
owner 107:107), the files' bytes, zero padding, the two end blocks. So when a pulled layer is exactly that
layout for the files the verified envelope signs, every byte of it is either one of those fixed bytes, compared
here, or a byte of a signed file, checked against its signed digest (`Library.add_fetched`): the layer's own
digest would check nothing more, and computing it is a second SHA-256 pass over every byte (ADR 0034). Any other
layer (another tool's tar, a size that is not the layout's, a byte that departs from it) is checked against its
OCI digest; when the departure comes late, the digest is caught up over what was already received.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hostguard.errors import DigestMismatchError, FormatError

KUBEVIRT_QEMU_ID = 107  # the qemu user of KubeVirt's virt-launcher: containerDisk files must be readable by it
CHUNK = 1 << 20
QUEUE_MAX = 8  # chunks waiting for a hashing thread
BLOCK = 512

Layout = list[bytes | int]  # fixed bytes, or the length of a file's data


def tar_header(name: str, size: int, *, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o555 if directory else 0o440
    info.uid = info.gid = KUBEVIRT_QEMU_ID
    info.uname = info.gname = ""
    info.mtime = 0  # the same disk gives the same layer digest
    return info.tobuf(format=tarfile.PAX_FORMAT)


def layer_layout(files: Sequence[tuple[str, int]]) -> Layout:
    """The layer `push` writes for these (member name, size) files, in this order."""
    layout: Layout = [tar_header(f"{d}/", 0, directory=True) for d in sorted({n.split("/", 1)[0] for n, _ in files})]
    for name, size in files:
        layout += [tar_header(name, size), size]
        if size % BLOCK:
            layout.append(b"\0" * (BLOCK - size % BLOCK))
    layout.append(b"\0" * (2 * BLOCK))
    return layout


def layout_size(layout: Layout) -> int:
    return sum(s if isinstance(s, int) else len(s) for s in layout)


class LayerWriter:
    """The layer's bytes as an iterator, hashing the layer and each file as they pass."""

    def __init__(self, files: list[tuple[str, Path]]) -> None:
        self.files = files
        self.layer = hashlib.sha256()
        self.size = 0
        self.file_digests: dict[str, tuple[str, int]] = {}

    def _emit(self, data: bytes) -> bytes:
        self.layer.update(data)
        self.size += len(data)
        return data

    def chunks(self) -> Iterator[bytes]:
        handles = [path.open("rb") for _, path in self.files]
        try:
            sizes = [os.fstat(fh.fileno()).st_size for fh in handles]
            opened = iter(zip(self.files, handles, sizes, strict=True))
            for segment in layer_layout([(name, size) for (name, _), size in zip(self.files, sizes, strict=True)]):
                if isinstance(segment, bytes):
                    yield self._emit(segment)
                    continue
                (name, path), fh, size = next(opened)
                h, done = hashlib.sha256(), 0
                while done < size and (chunk := fh.read(min(CHUNK, size - done))):
                    h.update(chunk)
                    done += len(chunk)
                    yield self._emit(chunk)
                if done != size or fh.read(1):
                    raise DigestMismatchError(f"{path} changed size while it was pushed")
                self.file_digests[name] = (h.hexdigest(), size)
        finally:
            for fh in handles:
                fh.close()

    def digest(self) -> str:
        return f"sha256:{self.layer.hexdigest()}"


class ThreadHash:
    """sha256 in a worker thread (hashlib releases the GIL on large buffers): digests, the download and the
    writes overlap on two cores instead of running one after the other. The queue is bounded, so memory stays
    flat."""

    def __init__(self) -> None:
        import queue
        import threading

        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=QUEUE_MAX)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: bytes | memoryview) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        if self._digest is None:
            self._queue.put(None)
            self._thread.join()
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        self.hexdigest()


class LayerCheck:
    """What vouches for a layer being downloaded: the signed layout while every byte follows it, else the
    layer's digest. `update()` takes the layer's bytes in order, before the unpacker writes them out;
    `files()` gives the files the unpacker has written so far, in member order (the catch-up reads them)."""

    def __init__(self, layout: Layout | None, files: Callable[[], list[Path]]) -> None:
        self.layout = layout
        self.files = files
        self.hash: ThreadHash | None = ThreadHash() if layout is None else None
        self.seen = 0
        self._seg = self._off = 0

    def update(self, data: bytes | memoryview) -> None:
        if self.hash is None and not self._follows(memoryview(data)):
            self._catch_up()
        if self.hash is not None:
            self.hash.update(data)
        self.seen += len(data)

    def _follows(self, data: memoryview) -> bool:
        assert self.layout is not None
        layout, i = self.layout, 0
        while True:
            while self._seg < len(layout) and self._off == _length(layout[self._seg]):
                self._seg, self._off = self._seg + 1, 0
            if i == len(data):
                return True
            if self._seg == len(layout):
                return False  # bytes after the layout's end
            segment = layout[self._seg]
            n = min(_length(segment) - self._off, len(data) - i)
            if isinstance(segment, bytes) and data[i : i + n] != segment[self._off : self._off + n]:
                return False
            i, self._off = i + n, self._off + n

    def _catch_up(self) -> None:
        """Start the layer digest over the `seen` bytes already passed on: the layout's fixed bytes, which they
        followed, and the files' bytes as the unpacker wrote them."""
        assert self.layout is not None
        self.hash = ThreadHash()
        left, files = self.seen, iter(self.files())
        for segment in self.layout:
            if left == 0:
                break
            n = min(_length(segment), left)
            if isinstance(segment, bytes):
                self.hash.update(segment[:n])
            else:
                path = next(files, None)
                if path is None:
                    raise FormatError("layer tar departs from its headers: the unpacked files do not match")
                _hash_file(self.hash, path, n)
            left -= n

    def verify(self, digest: str) -> str:
        """How the layer was vouched for, or DigestMismatchError. Call after every byte was passed on."""
        if self.hash is None:
            self._follows(memoryview(b""))  # step over trailing empty segments
            assert self.layout is not None
            if self._seg == len(self.layout):
                return "signed layout"
            self._catch_up()  # ended short of the layout (the download's own checks make this unreachable)
        assert self.hash is not None
        if f"sha256:{self.hash.hexdigest()}" != digest:
            raise DigestMismatchError(f"layer {digest} as served does not match its digest: nothing was added")
        return "layer digest"

    def close(self) -> None:
        if self.hash is not None:
            self.hash.close()


def _length(segment: bytes | int) -> int:
    return segment if isinstance(segment, int) else len(segment)


def _hash_file(hash_: ThreadHash, path: Path, length: int) -> None:
    with path.open("rb") as fh:
        done = 0
        while done < length and (chunk := fh.read(min(CHUNK, length - done))):
            hash_.update(chunk)
            done += len(chunk)
    if done != length:
        raise FormatError("a partly downloaded file changed while the layer digest was caught up")
