"""Builders of synthetic kernel data for the memory unit tests: BTF blobs, guest memory, ELF cores, cpio."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterable, Sequence

from hostguard.memory import btf as B
from hostguard.memory.walk import MemoryFault


class BtfBuilder:
    """Encode BTF (include/uapi/linux/btf.h) the way the kernel lays it out."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.records: list[bytes] = []
        self._string_ids: dict[str, int] = {}

    def s(self, name: str) -> int:
        if not name:
            return 0
        if name not in self._string_ids:
            self._string_ids[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self._string_ids[name]

    def _add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: bool = False) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kflag else 0)
        self.records.append(struct.pack("<III", self.s(name), info, size_or_type) + extra)
        return len(self.records)

    def int_(self, name: str, size: int) -> int:
        return self._add(name, B.INT, 0, size, struct.pack("<I", size * 8))

    def ptr(self, target: int) -> int:
        return self._add("", B.PTR, 0, target)

    def typedef(self, name: str, target: int) -> int:
        return self._add(name, B.TYPEDEF, 0, target)

    def const(self, target: int) -> int:
        return self._add("", B.CONST, 0, target)

    def array(self, elem: int, index: int, n: int) -> int:
        return self._add("", B.ARRAY, 0, 0, struct.pack("<III", elem, index, n))

    def struct(
        self, name: str, size: int, members: Iterable[tuple[str, int, int]], *, union: bool = False, kflag: bool = False
    ) -> int:
        members = list(members)
        extra = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self._add(name, B.UNION if union else B.STRUCT, len(members), size, extra, kflag)

    def fwd(self, name: str) -> int:
        return self._add(name, B.FWD, 0, 0)

    def enum(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<Ii", self.s(n), v) for n, v in values.items())
        return self._add(name, B.ENUM, len(values), 4, extra)

    def func_proto(self, ret: int, params: list[int]) -> int:
        return self._add("", B.FUNC_PROTO, len(params), ret, b"".join(struct.pack("<II", 0, p) for p in params))

    def build(self) -> bytes:
        types = b"".join(self.records)
        header = struct.pack("<HBBIIIII", B.BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)


class FakeMemory:
    """Sparse guest memory: written ranges read back, everything else faults."""

    def __init__(self, base: int = 0xFFFF888000000000) -> None:
        self.chunks: dict[int, bytearray] = {}
        self.reads = 0
        self.next = base

    def alloc(self, size: int, data: bytes = b"") -> int:
        """A zeroed object of `size` bytes (holding `data` at its start), on pages of its own: like real memory,
        reads fault only across page boundaries."""
        address = self.next
        pages = (max(size, 1) + 0xFFF) & ~0xFFF
        self.next += pages
        self.chunks[address] = bytearray(data.ljust(pages, b"\0"))
        return address

    def put(self, address: int, fmt: str, *values: int) -> None:
        """struct.pack `values` into whatever object holds `address`."""
        data = struct.pack("<" + fmt, *values)
        for start, chunk in self.chunks.items():
            if start <= address and address + len(data) <= start + len(chunk):
                chunk[address - start : address - start + len(data)] = data
                return
        raise KeyError(f"{address:#x} is not in an allocated object")

    def put_bytes(self, address: int, data: bytes) -> None:
        for start, chunk in self.chunks.items():
            if start <= address and address + len(data) <= start + len(chunk):
                chunk[address - start : address - start + len(data)] = data
                return
        raise KeyError(f"{address:#x} is not in an allocated object")

    def write(self, address: int, data: bytes) -> None:
        self.chunks[address] = bytearray(data)

    def u64(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<Q", value))

    def u32(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<I", value))

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        for start, data in self.chunks.items():
            if start <= address and address + size <= start + len(data):
                return bytes(data[address - start : address - start + size])
        raise MemoryFault(f"unmapped {address:#x}+{size}")


def elf_core(
    segments: list[tuple[int, bytes]],
    notes: Sequence[tuple[bytes, int, bytes]] = (),
    *,
    misalign: int = 0,
) -> bytes:
    """An ELF64 core: one PT_NOTE (if notes), then one PT_LOAD per (physical address, data). `misalign` shifts
    the segments' file offsets off page boundaries, as QEMU's dumps are."""
    note_blob = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        note_blob += struct.pack("<III", len(n), len(desc), ntype) + n.ljust(-(-len(n) // 4) * 4, b"\0")
        note_blob += desc.ljust(-(-len(desc) // 4) * 4, b"\0")
    phnum = len(segments) + (1 if notes else 0)
    phoff = 64
    data_off = phoff + 56 * phnum
    headers = []
    body = b""
    pos = data_off
    if notes:
        headers.append(struct.pack("<IIQQQQQQ", 4, 0, pos, 0, 0, len(note_blob), len(note_blob), 0))
        body += note_blob
        pos += len(note_blob)
    pad = (-pos % 4096) + misalign
    body += bytes(pad)
    pos += pad
    for paddr, data in segments:
        headers.append(struct.pack("<IIQQQQQQ", 1, 0, pos, 0, paddr, len(data), len(data), 0))
        body += data
        pos += len(data)
    ehdr = (
        b"\x7fELF"
        + bytes([2, 1, 1])
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    )
    return ehdr + b"".join(headers) + body


def elf_header(e_type: int = 3, machine: int = 62, elf_class: int = 2, fill: bytes = b"") -> bytes:
    """A minimal valid ELF header (64 or 32-bit little-endian) followed by `fill`."""
    if elf_class == 2:
        hdr = (
            b"\x7fELF"
            + bytes([2, 1, 1])
            + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, 0, 64, 0, 0, 64, 56, 0, 0, 0, 0)
        )
    else:
        hdr = (
            b"\x7fELF"
            + bytes([1, 1, 1])
            + bytes(9)
            + struct.pack("<HHIIIIIHHHHHH", e_type, machine, 1, 0, 52, 0, 0, 52, 32, 0, 0, 0, 0)
        )
    return hdr + fill


def cpio_newc(entries: list[tuple[str, bytes, int]]) -> bytes:
    """A newc archive of (name, data, mode) entries plus the trailer, padded to 512 bytes like cpio does."""
    out = b""
    ino = 1
    for name, data, mode in [*entries, ("TRAILER!!!", b"", 0)]:
        n = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(n), 0]
        hdr = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
        out += hdr + n
        out += bytes(-len(out) % 4) + data
        out += bytes(-len(out) % 4)
        ino += 1
    return out + bytes(-len(out) % 512)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)
