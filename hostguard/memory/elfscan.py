"""The second signal: ELF headers of executables and shared objects anywhere in guest physical memory.

A file's first page in the page cache is exactly the file's first 4 KiB (zero-filled past the end), and a
program that runs has that page in memory: it is mapped. So every page that starts with a valid ELF header
of type ET_EXEC or ET_DYN is hashed whole and compared with the first pages of the manifest's files (and of
the signed kernel and initrd). This does not depend on the task list, so a rootkit that unlinks its process
still leaves its header page behind. The kernel image itself holds ELF pages that are no file: the vDSO
images, patched at boot by the kernel's alternatives (so they differ from the kernel file). Those are taken
from a trusted reference boot and kept per kernel digest (`BaselineStore`).

Only the ELF (raw) dump format is scanned; `acquire` always asks libvirt for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hostguard.errors import FormatError, HostguardError
from hostguard.host.fsutil import atomic_write
from hostguard.memory.model import ElfPage
from hostguard.memory.walk import MemoryFault
from hostguard.record import Record

PAGE = 4096
ELF_MAGIC = b"\x7fELF"
MAX_HITS = 1 << 16
MAX_SEGMENTS = 4096
E_TYPES = {2: "exec", 3: "dyn"}
BASELINE_SCHEMA = 1


def head_page_sha256(data: bytes) -> str:
    """Digest of a file's first page as memory holds it: the first 4 KiB, zero-padded."""
    return hashlib.sha256(data[:PAGE].ljust(PAGE, b"\0")).hexdigest()


def is_elf_program_header(page: bytes) -> tuple[str, int, int] | None:
    """(e_type name, e_machine, class) when `page` starts with a plausible ELF header of an executable
    or shared object, else None. Checks the fields every loader checks, so random data rarely passes."""
    if len(page) < 52 or not page.startswith(ELF_MAGIC):
        return None
    elf_class, data, version = page[4], page[5], page[6]
    if elf_class not in (1, 2) or data not in (1, 2) or version != 1 or len(page) < (52 if elf_class == 1 else 64):
        return None
    order = "<" if data == 1 else ">"
    e_type, e_machine, e_version = struct.unpack_from(order + "HHI", page, 16)
    if e_type not in E_TYPES or e_version != 1:
        return None
    ehsize = struct.unpack_from(order + "H", page, 40 if elf_class == 1 else 52)[0]
    if ehsize != (52 if elf_class == 1 else 64):
        return None
    return E_TYPES[e_type], e_machine, elf_class


def _load_segments(fh: mmap.mmap) -> list[tuple[int, int, int]]:
    """(file offset, guest physical address, size) of each PT_LOAD of an ELF64 little-endian core."""
    if fh[:4] != ELF_MAGIC or fh[4] != 2 or fh[5] != 1 or struct.unpack_from("<H", fh, 16)[0] != 4:
        raise FormatError("memory dump: not an ELF64 core file (use the raw/ELF dump format)")
    (e_phoff,) = struct.unpack_from("<Q", fh, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", fh, 54)
    if e_phentsize < 56 or e_phnum > MAX_SEGMENTS or e_phoff + e_phnum * e_phentsize > len(fh):
        raise FormatError("memory dump: bad program header table")
    out = []
    for i in range(e_phnum):
        p_type, _f, p_offset, _va, p_paddr, p_filesz = struct.unpack_from("<IIQQQQ", fh, e_phoff + i * e_phentsize)
        if p_type == 1 and p_filesz:
            if p_offset + p_filesz > len(fh):
                raise FormatError("memory dump: a memory segment lies outside the file")
            out.append((p_offset, p_paddr, p_filesz))
    return out


CHUNK = 16 << 20  # bytes read at a time: bounds host memory whatever the guest size


def _segment_pages(f: io.BufferedReader, offset: int, paddr: int, size: int) -> Iterator[tuple[int, bytes]]:
    """(guest physical address, page) of each page in one segment that starts with the ELF magic.
    Reads in chunks and looks only at page starts (a strided slice)."""
    skip = -paddr % PAGE
    pos = offset + skip
    end = offset + size
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while pos < end:
        want = min(CHUNK, end - pos)
        f.seek(pos)
        got = f.readinto(view[:want])
        if not got:
            raise FormatError("memory dump: shorter than its program headers say")
        firsts = bytes(buf[0:got:PAGE])
        i = firsts.find(0x7F)
        while i >= 0:
            start = i * PAGE
            if buf[start : start + 4] == ELF_MAGIC:
                yield paddr + (pos - offset) + start, bytes(buf[start : min(start + PAGE, got)]).ljust(PAGE, b"\0")
            i = firsts.find(0x7F, i + 1)
        pos += got


def scan_dump(path: Path, *, kernel_image: tuple[int, int] | None = None, max_hits: int = MAX_HITS) -> list[ElfPage]:
    """Every page-aligned ELF executable/shared-object header in the dump. `kernel_image` is the guest
    physical range [start, end) of the kernel image, to mark hits inside it."""
    with path.open("rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as fh:
            segments = _load_segments(fh)
        pages = (hit for offset, paddr, size in segments for hit in _segment_pages(f, offset, paddr, size))
        return judge_pages(pages, kernel_image, max_hits)


def scan_chunks(
    chunks: Iterable[tuple[int, bytes]], *, kernel_image: tuple[int, int] | None = None, max_hits: int = MAX_HITS
) -> list[ElfPage]:
    """`scan_dump` over (page-aligned guest physical address, bytes) chunks: guest RAM read in place."""
    return judge_pages((hit for paddr, data in chunks for hit in _chunk_pages(paddr, data)), kernel_image, max_hits)


def _chunk_pages(paddr: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    if paddr % PAGE:
        raise FormatError(f"memory chunk at {paddr:#x} is not page aligned")
    firsts = data[0 : len(data) : PAGE]
    i = firsts.find(0x7F)
    while i >= 0:
        start = i * PAGE
        if data[start : start + 4] == ELF_MAGIC:
            yield paddr + start, data[start : start + PAGE].ljust(PAGE, b"\0")
        i = firsts.find(0x7F, i + 1)


def judge_pages(
    pages: Iterable[tuple[int, bytes]], kernel_image: tuple[int, int] | None, max_hits: int
) -> list[ElfPage]:
    out: list[ElfPage] = []
    for address, page in pages:
        header = is_elf_program_header(page)
        if header is None:
            continue
        if len(out) >= max_hits:
            raise FormatError(f"memory: more than {max_hits} ELF header pages")
        inside = kernel_image is not None and kernel_image[0] <= address < kernel_image[1]
        out.append(ElfPage(address, header[0], header[1], header[2], hashlib.sha256(page).hexdigest(), inside))
    return out


def read_dump_physical(path: Path, address: int, size: int) -> bytes:
    """`size` bytes at guest physical `address` of an ELF dump; `MemoryFault` if the dump does not hold them."""
    with open_dump(path) as (read, _):
        return read(address, size)


@contextlib.contextmanager
def open_dump(path: Path) -> Iterator[tuple[Callable[[int, int], bytes], int]]:
    """A reader of guest-physical memory in an ELF dump (`MemoryFault` where the dump holds nothing), and the
    end of the highest range it holds: for many small reads (the file is opened and parsed once)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as fh:
        segments = _load_segments(fh)

        def read(address: int, size: int) -> bytes:
            for offset, paddr, length in segments:
                if paddr <= address and address + size <= paddr + length:
                    return bytes(fh[offset + address - paddr : offset + address - paddr + size])
            raise MemoryFault(f"guest physical {address:#x} (+{size}) is not in the dump")

        yield read, max((paddr + length for _, paddr, length in segments), default=0)


def kernel_physical_range(image_start: int, image_end: int, kernel_offset: int, phys_base: int) -> tuple[int, int]:
    """Guest physical extent of the kernel image on x86-64: __pa_symbol(x) = x - __START_KERNEL_map + phys_base,
    where x is the run-time (link + KASLR offset) address."""
    start_kernel_map = 0xFFFFFFFF80000000
    start = image_start + kernel_offset - start_kernel_map + phys_base
    end = image_end + kernel_offset - start_kernel_map + phys_base
    return start, end


# --- the per-kernel baseline --------------------------------------------------------------------------------


class Baseline(Record):
    kernel_sha256: str
    pages: frozenset[str]  # page digests


class BaselineStore:
    """ELF pages of the kernel image itself (the vDSOs), per kernel file digest, from trusted reference
    boots: `<dir>/<kernel sha256>.json`, root-only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, kernel_sha256: str) -> Path:
        if len(kernel_sha256) != 64 or not all(c in "0123456789abcdef" for c in kernel_sha256):
            raise FormatError("kernel digest must be 64 lower-case hex digits")
        return self.directory / f"{kernel_sha256}.json"

    def load(self, kernel_sha256: str) -> Baseline | None:
        path = self._path(kernel_sha256)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise HostguardError(f"vDSO baseline {path} is unreadable: {err}") from None
        pages = doc.get("pages") if isinstance(doc, dict) else None
        if (
            doc.get("schema") != BASELINE_SCHEMA
            or doc.get("kernel_sha256") != kernel_sha256
            or not isinstance(pages, list)
            or not all(isinstance(p, str) and len(p) == 64 for p in pages)
        ):
            raise HostguardError(f"vDSO baseline {path} is malformed: record it again")
        return Baseline(kernel_sha256, frozenset(pages))

    def record(self, kernel_sha256: str, pages: Iterable[str]) -> Baseline:
        """Add page digests (merging with what is stored: several reference boots, e.g. CPU models)."""
        old = self.load(kernel_sha256)
        merged = frozenset(pages) | (old.pages if old else frozenset())
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {"schema": BASELINE_SCHEMA, "kernel_sha256": kernel_sha256, "pages": sorted(merged)}
        atomic_write(self._path(kernel_sha256), json.dumps(doc, indent=1).encode(), mode=0o600, error=HostguardError)
        return Baseline(kernel_sha256, merged)


def baseline_candidates(pages: Iterable[ElfPage], known: Iterable[str]) -> set[str]:
    """From a trusted reference boot: the kernel-image ELF pages that are no known file."""
    known_set = set(known)
    return {p.sha256 for p in pages if p.in_kernel_image and p.sha256 not in known_set}
