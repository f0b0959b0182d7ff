"""The vmlinux ELF inside a kernel file, read without trusting it to be well-formed.

* `extract_vmlinux`: a bzImage's compressed payload (gzip, xz, lzma, bzip2 or zstd), found through the setup
  header (`payload_offset`/`payload_length`, boot protocol >= 2.08), streamed into a file; an ELF vmlinux is
  copied as it is. Output is bounded (`MAX_VMLINUX`); memory use stays at a few MiB.
* `Vmlinux`: program and section headers, a section's bytes (`.BTF`), the GNU build id, the load extent,
  and reads by link-time virtual address (for the kallsyms tables).
"""

from __future__ import annotations

import bz2
import lzma
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from hostguard.errors import FormatError

MAX_VMLINUX = 1 << 30
MAX_SECTIONS = 65535
START_KERNEL_MAP = 0xFFFFFFFF80000000


def _payload(head: bytes) -> tuple[int, int] | None:
    """(offset, length) of a bzImage's compressed vmlinux, or None if `head` is not a bzImage."""
    if len(head) < 0x250 or head[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", head, 0x206)[0]
    if version < 0x208:
        raise FormatError("kernel: bzImage boot protocol older than 2.08 has no payload fields")
    setup_sects = head[0x1F1] or 4
    offset, length = struct.unpack_from("<II", head, 0x248)
    return (setup_sects + 1) * 512 + offset, length


def _decompressor(magic: bytes) -> tuple[str, Callable[[], Any] | None]:
    if magic.startswith(b"\x1f\x8b"):
        return "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    if magic.startswith(b"\x5d\x00\x00"):
        return "lzma", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    if magic.startswith(b"BZh"):
        return "bzip2", bz2.BZ2Decompressor
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd", None  # through the zstd tool
    if magic.startswith(b"\x02\x21\x4c\x18"):
        return "lz4", None
    return "unknown", None


def extract_vmlinux(kernel: Path, out: BinaryIO) -> None:
    """Write the vmlinux ELF inside `kernel` (a bzImage, or already an ELF file) to `out`."""
    with kernel.open("rb") as f:
        head = f.read(0x1000)
        if head.startswith(b"\x7fELF"):
            f.seek(0)
            shutil.copyfileobj(f, out)
            return
        where = _payload(head)
        if where is None:
            raise FormatError(f"kernel {kernel.name}: neither a bzImage nor an ELF vmlinux")
        offset, length = where
        size = os.fstat(f.fileno()).st_size
        if offset + length > size:
            raise FormatError(f"kernel {kernel.name}: payload lies outside the file")
        f.seek(offset)
        magic = f.read(8)
        f.seek(offset)
        name, make = _decompressor(magic)
        if name == "zstd":
            _zstd_tool(f, length, out, kernel)
            return
        if make is None:
            raise FormatError(f"kernel {kernel.name}: {name} compressed payload is not supported")
        _stream(make(), name, f, length, out, what=kernel.name)


def _stream(dec: Any, name: str, f: BinaryIO, length: int, out: BinaryIO, *, what: str) -> None:
    """Decompress `length` bytes of `f` into `out`, never holding more than a few MiB, output bounded."""
    written = 0
    remaining = length
    pending = b""
    while not dec.eof:
        if name == "gzip":
            if not pending:
                pending = f.read(min(remaining, 1 << 20))
                remaining -= len(pending)
                if not pending:
                    break
            part = dec.decompress(pending, 16 << 20)
            pending = dec.unconsumed_tail
        else:
            chunk = b""
            if dec.needs_input:
                chunk = f.read(min(remaining, 1 << 20))
                remaining -= len(chunk)
                if not chunk:
                    break
            part = dec.decompress(chunk, 16 << 20)
        written += len(part)
        if written > MAX_VMLINUX:
            raise FormatError(f"kernel {what}: vmlinux larger than {MAX_VMLINUX} bytes")
        out.write(part)
    if not dec.eof:
        raise FormatError(f"kernel {what}: {name} payload is truncated")


def _zstd_tool(f: BinaryIO, length: int, out: BinaryIO, kernel: Path) -> None:
    tool = shutil.which("zstd")
    if tool is None:
        raise FormatError(f"kernel {kernel.name}: zstd compressed payload needs the zstd tool")
    with tempfile.TemporaryFile() as src:
        remaining = length
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            src.write(chunk)
            remaining -= len(chunk)
        src.seek(0)
        with subprocess.Popen(
            [tool, "-dc", "--no-progress"], stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None
            written = 0
            try:
                for chunk in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
                    written += len(chunk)
                    if written > MAX_VMLINUX:
                        raise FormatError(f"kernel {kernel.name}: vmlinux larger than {MAX_VMLINUX} bytes")
                    out.write(chunk)
            except BaseException:
                proc.kill()
                raise
            stderr = proc.stderr.read() if proc.stderr is not None else b""
            proc.wait(timeout=60)
    # The kernel appends the decompressed size after the zstd frame; zstd calls that trailing data an
    # "unsupported format" after decompressing the frame. Anything else (a truncated frame) is an error.
    message = stderr.decode(errors="replace")
    if proc.returncode != 0 and (written == 0 or "unsupported format" not in message or "error" in message.lower()):
        raise FormatError(f"kernel {kernel.name}: zstd failed: {' '.join(message.split())[:200]}")


# --- the vmlinux ELF ----------------------------------------------------------------------------------------


class Vmlinux:
    """Read-only view of a vmlinux ELF64 little-endian file (bounded)."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise FormatError("vmlinux: not an ELF64 little-endian file")
        (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 32)
        e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHHHH", data, 54)
        self.segments: list[tuple[int, int, int, int, int]] = []  # (type, offset, vaddr, filesz, memsz)
        if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
            raise FormatError("vmlinux: bad program header table")
        for i in range(e_phnum):
            entry = struct.unpack_from("<IIQQQQQ", data, e_phoff + i * e_phentsize)
            p_type, _fl, off, vaddr, _pa, filesz, memsz = entry
            self.segments.append((p_type, off, vaddr, filesz, memsz))
        self.sections: dict[str, tuple[int, int, int, int]] = {}  # name -> (type, addr, offset, size)
        if e_shnum == 0:
            return
        if e_shentsize < 64 or e_shnum > MAX_SECTIONS or e_shoff + e_shnum * e_shentsize > len(data):
            raise FormatError("vmlinux: bad section header table")
        raw = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
        if e_shstrndx >= e_shnum:
            raise FormatError("vmlinux: bad section name table index")
        _n, _t, _f, _a, str_off, str_size = raw[e_shstrndx]
        if str_off + str_size > len(data):
            raise FormatError("vmlinux: section names outside the file")
        names = bytes(data[str_off : str_off + str_size])
        for name_off, sh_type, _flags, addr, off, size in raw:
            end = names.find(b"\0", name_off)
            name = names[name_off:end].decode("ascii", "replace") if 0 <= name_off < len(names) and end >= 0 else ""
            if sh_type != 8 and off + size > len(data):  # SHT_NOBITS has no file content
                raise FormatError(f"vmlinux: section {name} outside the file")
            self.sections.setdefault(name, (sh_type, addr, off, size))

    def section(self, name: str) -> bytes | None:
        s = self.sections.get(name)
        if s is None or s[0] == 8:
            return None
        return bytes(self.data[s[2] : s[2] + s[3]])

    def build_id(self) -> str | None:
        for p_type, off, _va, filesz, _m in self.segments:
            if p_type != 4 or filesz > 1 << 20 or off + filesz > len(self.data):
                continue
            pos, end = off, off + filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                desc = pos + 12 + ((namesz + 3) & ~3)
                if desc + descsz > end:
                    break
                if ntype == 3 and bytes(self.data[pos + 12 : pos + 12 + namesz]).rstrip(b"\0") == b"GNU":
                    return bytes(self.data[desc : desc + descsz]).hex()
                pos = desc + ((descsz + 3) & ~3)
        return None

    def image_extent(self) -> tuple[int, int]:
        """(first, end) link-time virtual addresses of the kernel-space load segments."""
        loads = [(va, va + memsz) for t, _o, va, _f, memsz in self.segments if t == 1 and va >= START_KERNEL_MAP]
        if not loads:
            raise FormatError("vmlinux: no kernel-space load segment")
        return min(a for a, _ in loads), max(b for _, b in loads)

    def read_virtual(self, address: int, size: int) -> bytes:
        for t, off, va, filesz, _m in self.segments:
            if t == 1 and va >= START_KERNEL_MAP and va <= address and address + size <= va + filesz:
                start = off + address - va
                return bytes(self.data[start : start + size])
        raise FormatError(f"vmlinux: address {address:#x} (+{size}) is not in the file")


def extract_btf(kernel: Path) -> bytes | None:
    """The `.BTF` section of a kernel file (for tools and tests); None if it has none."""
    with tempfile.TemporaryFile() as tmp:
        extract_vmlinux(kernel, tmp)
        tmp.flush()
        with mmap.mmap(tmp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return Vmlinux(data).section(".BTF")
