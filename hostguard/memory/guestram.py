"""Guest RAM read in place from the running QEMU process: no dump, nothing written anywhere.

QEMU keeps guest RAM in its own address space. Which guest-physical ranges are RAM, and which RAM block and
offset each one is, comes from QEMU itself (`info mtree -f`, the flat view of the "memory" address space,
through libvirt's monitor passthrough), so a split below/above the PCI hole is mapped as QEMU maps it. Where
each RAM block lives in QEMU's address space comes from `/proc/<pid>/maps`: the one read-write mapping of
exactly the block's size (`info ramblock`'s Total; QEMU maps a block as one region of that size). Reads go
through `/proc/<pid>/mem` (root, ptrace read access), all opened relative to one `/proc/<pid>` directory
descriptor, so every file belongs to the same process, which must carry the domain's UUID on its command line.

For private anonymous RAM (libvirt's default memory backing) a page QEMU never touched reads as zeros;
`/proc/<pid>/pagemap` says which pages exist, so whole-RAM scans cost what the guest has used, not its size.
A shared or file-backed block is scanned whole: another process may have written pages QEMU never mapped.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import functools
import itertools
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from hostguard.errors import HostguardError
from hostguard.host.libc import libc
from hostguard.memory.walk import MemoryFault
from hostguard.record import Record

PAGE = 4096
CHUNK = 4 << 20  # bytes read at a time by scans: bounds host memory whatever the guest size
MAX_FROZEN_PAGES = 2048  # 8 MiB of pages kept during one paused walk
PAGEMAP_WINDOW = 1 << 18  # pagemap entries read at a time (2 MiB of entries, 1 GiB of guest RAM)
# pagemap bits 63 (present) and 62 (swapped): in the top byte of each little-endian u64 entry
_PRESENT = bytes(1 if b & 0xC0 else 0 for b in range(256))
_SHARED = bytes(1 if b & 0xC1 == 0x80 else 0 for b in range(256))  # present, in RAM, not exclusively mapped
MAX_MONITOR_TEXT = 4 << 20
MAX_RANGES = 4096

_FLAT_VIEW = re.compile(r"^FlatView #\d+$")
_AS_LINE = re.compile(r'^ AS "([^"]*)", root: (.*)$')
_RANGE = re.compile(r"^\s+([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, ([a-z]+)\): (\S+)(?: @([0-9a-f]{16}))?(?: .*)?$")
_RAMBLOCK = re.compile(r"^\s*(\S+)\s+\d+ [KMG]iB\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\b")
_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ([-rwxps]{4}) ([0-9a-f]+) \S+ (\d+)\s*(.*)$")


class GuestRamError(HostguardError):
    """Guest RAM cannot be read in place (no QEMU process, an unexpected memory layout, no access)."""


class FlatRange(Record):
    """One range of QEMU's flat view: guest-physical [start, end), region kind, RAM block and offset in it."""

    start: int
    end: int
    kind: str  # "ram", "rom", "romd", "i/o"
    block: str
    offset: int


class RamRange(Record):
    gpa: int
    size: int
    hva: int  # where QEMU has it
    block: str


class MapEntry(Record):
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str


def parse_flat_view(text: str, address_space: str = "memory") -> list[FlatRange]:
    """The ranges of `address_space` in `info mtree -f` output (the first flat view that serves it)."""
    out: list[FlatRange] = []
    in_view = found = False
    for line in text.splitlines():
        if _FLAT_VIEW.match(line):
            if found:
                break
            in_view = False
            continue
        m = _AS_LINE.match(line)
        if m:
            in_view = in_view or m.group(1) == address_space
            found = found or in_view
            continue
        if not in_view:
            continue
        r = _RANGE.match(line)
        if r:
            start, last = int(r.group(1), 16), int(r.group(2), 16)
            if last < start:
                raise GuestRamError(f"QEMU's memory tree has a reversed range {line.strip()[:80]!r}")
            out.append(FlatRange(start, last + 1, r.group(3), r.group(4), int(r.group(5) or "0", 16)))
            if len(out) > MAX_RANGES:
                raise GuestRamError("QEMU's memory tree has too many ranges")
    if not found:
        raise GuestRamError(f"QEMU's memory tree has no flat view of address space {address_space!r}")
    return out


def parse_ramblocks(text: str) -> dict[str, int]:
    """RAM block name -> total (maximum) length, from `info ramblock`."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _RAMBLOCK.match(line)
        if m:
            out[m.group(1)] = int(m.group(4), 16)
    return out


def parse_maps(text: str) -> list[MapEntry]:
    out = []
    for line in text.splitlines():
        m = _MAPS.match(line)
        if m:
            start, end, offset = int(m.group(1), 16), int(m.group(2), 16), int(m.group(4), 16)
            out.append(MapEntry(start, end, m.group(3), offset, int(m.group(5)), m.group(6).strip()))
    return out


def ram_layout(
    flat: Sequence[FlatRange], blocks: dict[str, int], maps: Sequence[MapEntry]
) -> tuple[list[RamRange], bool]:
    """Guest-physical RAM ranges with their host addresses, and whether all of them are private anonymous
    memory (pagemap's "not present" then means "zeros"). Every range QEMU calls RAM must be placed."""
    wanted = sorted({r.block for r in flat if r.kind == "ram"})
    if not wanted:
        raise GuestRamError("QEMU's memory tree shows no RAM")
    placed: dict[str, MapEntry] = {}
    for name in wanted:
        total = blocks.get(name)
        if total is None:
            raise GuestRamError(f"RAM block {name!r} is not in QEMU's block list")
        found = [m for m in maps if m.end - m.start == total and m.perms.startswith("rw") and m.offset == 0]
        if len(found) != 1:
            raise GuestRamError(
                f"RAM block {name!r} ({total >> 20} MiB): {len(found)} mappings of that size in the QEMU process"
            )
        placed[name] = found[0]
    ranges = []
    for r in flat:
        host = placed.get(r.block)
        if host is None or r.kind not in ("ram", "rom"):
            continue  # I/O, and ROMs of their own (the BIOS): not guest RAM
        if r.offset + (r.end - r.start) > host.end - host.start:
            raise GuestRamError(f"guest range {r.start:#x}-{r.end:#x} lies outside RAM block {r.block!r}")
        ranges.append(RamRange(r.start, r.end - r.start, host.start + r.offset, r.block))
    ranges.sort(key=lambda x: x.gpa)
    for a, b in itertools.pairwise(ranges):
        if a.gpa + a.size > b.gpa:
            raise GuestRamError(f"guest RAM ranges overlap at {b.gpa:#x}")
    anonymous = all(m.perms == "rw-p" and m.inode == 0 and not m.path for m in placed.values())
    return ranges, anonymous


class GuestRam:
    """Reads guest-physical memory of one running QEMU process. Close it (or use `with`)."""

    def __init__(self, proc_dir: int, pid: int, ranges: Sequence[RamRange], anonymous: bool) -> None:
        self.pid = pid
        self.start_time = process_start_time(proc_dir)  # with the pid, names this process (pids are reused)
        self.ranges = list(ranges)
        self.anonymous = anonymous
        self._starts = [r.gpa for r in self.ranges]
        self._dir = proc_dir
        self._mem = os.open("mem", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_dir)
        self._pagemap: int | None = None
        self._pages: dict[int, bytes] | None = None  # while frozen: pages already read
        self.bytes_read = 0

    @property
    def end(self) -> int:
        """The end of the highest guest-physical RAM range."""
        return max(r.gpa + r.size for r in self.ranges)

    def same_process(self) -> bool:
        """The process is still alive and is the one opened (not a new one with the same pid)."""
        try:
            return process_start_time(self._dir) == self.start_time
        except GuestRamError:
            return False

    def close(self) -> None:
        for fd in (self._mem, self._pagemap, self._dir):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pagemap = None

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.ranges)

    def _range(self, gpa: int) -> RamRange | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return None
        r = self.ranges[i]
        return r if gpa < r.gpa + r.size else None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """While the guest is paused: reads within one page are served from pages already read (drgn reads
        the same page-table pages for every translation). Bounded: past MAX_FROZEN_PAGES, reads go through."""
        self._pages = {}
        try:
            yield
        finally:
            self._pages = None

    def read(self, gpa: int, size: int) -> bytes:
        """`size` bytes at guest-physical `gpa`; `MemoryFault` if any of it is not RAM."""
        pages = self._pages
        if pages is not None and gpa // PAGE == (gpa + size - 1) // PAGE:
            number = gpa // PAGE
            page = pages.get(number)
            if page is None:
                page = self._read(number * PAGE, PAGE)
                if len(pages) < MAX_FROZEN_PAGES:
                    pages[number] = page
            return page[gpa % PAGE : gpa % PAGE + size]
        return self._read(gpa, size)

    def _read(self, gpa: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            r = self._range(gpa)
            if r is None:
                raise MemoryFault(f"guest physical address {gpa:#x} is not RAM")
            n = min(size, r.gpa + r.size - gpa)
            out += self._pread(r.hva + gpa - r.gpa, n)
            gpa += n
            size -= n
        return bytes(out)

    def _pread(self, hva: int, size: int) -> bytes:
        try:
            data = os.pread(self._mem, size, hva)
        except OSError as err:
            raise MemoryFault(f"QEMU process {self.pid}: {err.strerror}") from None
        if len(data) != size:
            raise MemoryFault(f"QEMU process {self.pid}: short read at {hva:#x}")
        self.bytes_read += size
        return data

    def present_runs(self, r: RamRange) -> Iterator[tuple[int, int]]:
        """(offset, length) runs of pages of `r` that may hold something else than zeros: present or swapped,
        and not the kernel's shared zero page (what reading an untouched page, by anyone, maps)."""
        if not self.anonymous:
            yield 0, r.size
            return
        if self._pagemap is None:
            self._pagemap = os.open("pagemap", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir)
        if _pagemap_scan_works(self._pagemap, r.hva):
            for start, end in _scanned_runs(self._pagemap, r.hva, r.hva + r.size, self.pid):
                yield start - r.hva, end - start
            return
        first_page = r.hva // PAGE
        pages = r.size // PAGE
        run_start = -1
        for window in range(0, pages, PAGEMAP_WINDOW):
            n = min(PAGEMAP_WINDOW, pages - window)
            try:
                entries = os.pread(self._pagemap, n * 8, (first_page + window) * 8)
            except OSError as err:
                raise GuestRamError(f"QEMU process {self.pid}: pagemap: {err.strerror}") from None
            if len(entries) != n * 8:
                raise GuestRamError(f"QEMU process {self.pid}: short pagemap read")
            flags = _content_pages(entries, n, zero_pfns())  # one byte per page: 1 may hold data, 0 zeros
            i = 0
            while i < n:
                if run_start < 0:
                    j = flags.find(1, i)
                    if j < 0:
                        break
                    run_start = window + j
                    i = j
                j = flags.find(0, i)
                if j < 0:
                    break  # the run continues into the next window
                yield run_start * PAGE, (window + j - run_start) * PAGE
                run_start = -1
                i = j
        if run_start >= 0:
            yield run_start * PAGE, (pages - run_start) * PAGE

    def page_heads(self, magic: bytes, skip: Sequence[tuple[int, int]] = ()) -> Iterator[tuple[int, bytes]]:
        """(guest-physical address, page) of every page that starts with `magic` (at most 8 bytes): reads only
        the first bytes of each page that may hold data, 1024 pages per process_vm_readv call, then the
        pages that match. What a whole-RAM scan for headers needs, at a small part of its cost. `skip`:
        page-aligned guest-physical (start, end) ranges not to read (the guest kernel's own page array)."""
        import ctypes

        width = len(magic)
        readv = _process_vm_readv()
        heads = bytearray(width * HEADS_BATCH)
        local = array.array("Q", [ctypes.addressof((ctypes.c_char * len(heads)).from_buffer(heads)), 0])
        for r in self.ranges:
            for start, length in _without(self.present_runs(r), r.gpa, skip):
                for first in range(start, start + length, HEADS_BATCH * PAGE):
                    n = min(HEADS_BATCH, (start + length - first) // PAGE)
                    remote = array.array("Q", bytes(16 * n))
                    remote[0::2] = array.array("Q", range(r.hva + first, r.hva + first + n * PAGE, PAGE))
                    remote[1::2] = array.array("Q", [width]) * n
                    local[1] = width * n
                    got = readv(self.pid, local.buffer_info()[0], 1, remote.buffer_info()[0], n, 0)
                    if got != width * n:
                        raise GuestRamError(f"QEMU process {self.pid}: process_vm_readv read {got} of {width * n}")
                    self.bytes_read += got
                    pos = heads.find(magic, 0, width * n)
                    while pos >= 0:
                        if pos % width == 0:
                            offset = first + pos // width * PAGE
                            try:
                                yield r.gpa + offset, self._pread(r.hva + offset, PAGE)
                            except MemoryFault as err:
                                raise GuestRamError(str(err)) from None
                        pos = heads.find(magic, pos + 1, width * n)
        if not self.same_process():
            raise GuestRamError(f"QEMU process {self.pid} ended during the scan")

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[int, bytes]]:
        """(guest-physical address, bytes) covering every page that may hold anything but zeros."""
        for r in self.ranges:
            for start, length in self.present_runs(r):
                for offset in range(start, start + length, chunk):
                    n = min(chunk, start + length - offset)
                    try:
                        data = self._pread(r.hva + offset, n)
                    except MemoryFault as err:
                        raise GuestRamError(str(err)) from None
                    yield r.gpa + offset, data


def _without(runs: Iterable[tuple[int, int]], base: int, skip: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The (offset, length) runs of a range at guest-physical `base`, less the guest-physical `skip` ranges."""
    for start, length in runs:
        pieces = [(base + start, base + start + length)]
        for lo, hi in skip:
            pieces = [p for a, b in pieces for p in ((a, min(b, lo)), (max(a, hi), b)) if p[0] < p[1]]
        for a, b in pieces:
            yield a - base, b - a


# PAGEMAP_SCAN (Linux 6.7+): the kernel walks the page tables and returns runs of pages in the categories asked
# for, instead of 8 bytes of pagemap per page filtered here (~12 ms per 8 GiB of guest RAM on every scan).
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), 96 bytes
_PAGE_IS_PRESENT, _PAGE_IS_SWAPPED, _PAGE_IS_PFNZERO = 1 << 3, 1 << 4, 1 << 5
SCAN_REGIONS = 4096  # struct page_region slots per call (96 KiB): a fragmented guest costs more calls, not memory
_scan_works: list[bool] = []  # decided on the first call in this process


def _pagemap_scan_call(fd: int, start: int, end: int, vec: Any) -> tuple[int, int]:
    """One PAGEMAP_SCAN over [start, end): pages present or swapped and not the zero page (category PFNZERO
    inverted and required; the huge zero page is PFNZERO too), merged into runs. (regions filled, walk_end)."""
    import ctypes
    import fcntl

    arg = bytearray(
        struct.pack(
            "<12Q",
            96,  # size
            0,  # flags: report only, write-protect nothing
            start,
            end,
            0,  # walk_end: written by the kernel
            ctypes.addressof(vec),
            SCAN_REGIONS,
            0,  # max_pages: no limit
            _PAGE_IS_PFNZERO,  # category_inverted
            _PAGE_IS_PFNZERO,  # category_mask: (inverted) PFNZERO required, i.e. not the zero page
            _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED,  # category_anyof_mask
            0,  # return_mask: no categories reported, so adjacent matches merge into one region
        )
    )
    count = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
    return count, struct.unpack_from("<Q", arg, 32)[0]


def _pagemap_scan_works(fd: int, address: int) -> bool:
    """Whether this kernel answers PAGEMAP_SCAN (tried once per process on one page; else pagemap is read)."""
    if not _scan_works:
        import ctypes
        import errno

        vec = (ctypes.c_uint64 * 3)()
        try:
            _pagemap_scan_call(fd, address, address + PAGE, vec)
        except OSError as err:
            if err.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return False  # about this process (it ended, no access), not the kernel: decided on the next one
            _scan_works.append(False)  # no such ioctl (before 6.7), or an argument layout it does not know
        else:
            _scan_works.append(True)
    return _scan_works[0]


def _scanned_runs(fd: int, start: int, end: int, pid: int) -> Iterator[tuple[int, int]]:
    """[run start, run end) host addresses in [start, end) that may hold anything but zeros, by PAGEMAP_SCAN."""
    import ctypes

    vec = (ctypes.c_uint64 * (3 * SCAN_REGIONS))()
    pos, pending, last = start, None, start
    while pos < end:
        try:
            count, walk_end = _pagemap_scan_call(fd, pos, end, vec)
        except OSError as err:
            raise GuestRamError(f"QEMU process {pid}: PAGEMAP_SCAN: {err.strerror}") from None
        if not (0 <= count <= SCAN_REGIONS and pos < walk_end <= end):
            raise GuestRamError(f"QEMU process {pid}: PAGEMAP_SCAN answered {count} regions up to {walk_end:#x}")
        for i in range(count):
            run_start, run_end = vec[3 * i], vec[3 * i + 1]
            if not last <= run_start < run_end <= walk_end or (run_start | run_end) % PAGE:
                raise GuestRamError(f"QEMU process {pid}: PAGEMAP_SCAN region {run_start:#x} out of order")
            last = run_end
            if pending is not None and pending[1] == run_start:
                pending = (pending[0], run_end)
                continue
            if pending is not None:
                yield pending
            pending = (run_start, run_end)
        pos = walk_end
    if pending is not None:
        yield pending


@functools.lru_cache(maxsize=64)
def _equal_table(value: int, mask: int = 0xFF) -> bytes:
    return bytes(1 if b & mask == value & mask else 0 for b in range(256))


def _pfn_matches(entries: bytes, pfn: int, ignore_low_bits: int) -> int:
    """Bit mask (one 0x01 byte per entry, as an int) of the entries whose PFN (bits 0-54) equals `pfn` in all
    but its `ignore_low_bits` lowest bits. Vectorised with bytes.translate and big-int AND (no numpy here)."""
    out = -1
    for k in range(7):
        lo = max(0, ignore_low_bits - 8 * k)
        if lo >= 8:
            continue
        mask = (0xFF << lo) & (0x7F if k == 6 else 0xFF)  # byte 6 bit 7 is soft-dirty, not PFN
        out &= int.from_bytes(entries[k::8].translate(_equal_table((pfn >> (8 * k)) & 0xFF, mask)), "little")
    return out


def _content_pages(entries: bytes, n: int, zero: tuple[int, int] | None) -> bytes:
    tops = entries[7::8]
    flags = tops.translate(_PRESENT)
    # The zero page is never "exclusively mapped" (bit 56): when every present page is, none can be the zero
    # page (a guest no one has read whole), and the PFN comparison is skipped.
    if zero is None or tops.translate(_SHARED).find(1) < 0:
        return flags
    present = int.from_bytes(flags, "little")
    small, huge = zero
    present &= ~_pfn_matches(entries, small, 0)
    if huge:
        present &= ~_pfn_matches(entries, huge, 9)  # the 512 pages of the huge zero page
    return present.to_bytes(n, "little")


_zero: list[tuple[int, int] | None] = []


def zero_pfns() -> tuple[int, int] | None:
    """PFNs of the kernel's zero page and huge zero page (0: none), found by reading untouched memory of our
    own; None when PFNs are hidden (no CAP_SYS_ADMIN): then every present page is read."""
    if _zero:
        return _zero[0]
    import mmap

    huge = 2 << 20
    one = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # too small for a huge page
    area = mmap.mmap(-1, 2 * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes_address(area)
        aligned = (base + huge - 1) & ~(huge - 1)
        with contextlib.suppress(OSError, AttributeError):
            area.madvise(mmap.MADV_HUGEPAGE, aligned - base, huge)
        _ = one[0], area[aligned - base]  # read faults map the zero page, and the huge one where THP allows
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            pfns = [
                int.from_bytes(os.pread(fd, 8, a // PAGE * 8), "little") & ((1 << 55) - 1)
                for a in (ctypes_address(one), aligned)
            ]
        finally:
            os.close(fd)
    finally:
        one.close()
        area.close()
    small, big = pfns
    _zero.append(None if not small else (small, big if big != small else 0))
    return _zero[0]


def ctypes_address(buffer: object) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))  # type: ignore[arg-type]


HEADS_BATCH = 1024  # IOV_MAX: remote iovecs per process_vm_readv call
_vm_readv: list[Any] = []


def _process_vm_readv() -> Any:
    """libc's process_vm_readv through ctypes (the standard library has no binding)."""
    if not _vm_readv:
        import ctypes

        fn = libc().process_vm_readv
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        _vm_readv.append(fn)
    return _vm_readv[0]


Monitor = Callable[[str], str]


def open_guest_ram(pid: int, uuid: str, monitor: Monitor) -> GuestRam:
    """Guest RAM of QEMU process `pid`, which must be the one running domain `uuid`. `monitor` runs an HMP
    command on that domain's QEMU (hostguard.host.libvirt.qemu_monitor_hmp)."""
    try:
        proc_dir = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise GuestRamError(f"QEMU process {pid}: {err.strerror}") from None
    try:
        argv = _read_at(proc_dir, "cmdline").split(b"\0")
        wanted = uuid.lower().encode()
        if not any(a == b"-uuid" and b.lower() == wanted for a, b in itertools.pairwise(argv)):
            raise GuestRamError(f"process {pid} is not the QEMU of domain {uuid}")
        ranges, anonymous = _layout(proc_dir, monitor)
        return GuestRam(proc_dir, pid, ranges, anonymous)
    except BaseException:
        os.close(proc_dir)
        raise


def _layout(proc_dir: int, monitor: Monitor) -> tuple[list[RamRange], bool]:
    flat = parse_flat_view(_bounded(monitor("info mtree -f")))
    blocks = parse_ramblocks(_bounded(monitor("info ramblock")))
    maps = parse_maps(_read_at(proc_dir, "maps").decode(errors="replace"))
    return ram_layout(flat, blocks, maps)


def layout_unchanged(ram: GuestRam, monitor: Monitor) -> bool:
    """QEMU still maps guest RAM as when `ram` was opened (no memory hot-plugged or removed since): ~3 ms."""
    try:
        return _layout(ram._dir, monitor) == (ram.ranges, ram.anonymous)
    except GuestRamError:
        return False


def process_start_time(proc_dir: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); the command name before it may hold anything."""
    stat = _read_at(proc_dir, "stat")
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        raise GuestRamError("unreadable /proc/<pid>/stat") from None


def _bounded(text: str) -> str:
    if len(text) > MAX_MONITOR_TEXT:
        raise GuestRamError("the QEMU monitor's answer is too long")
    return text


def _read_at(proc_dir: int, name: str) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_dir)
    except OSError as err:
        raise GuestRamError(f"/proc/.../{name}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_MONITOR_TEXT)
