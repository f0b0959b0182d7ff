"""Guest RAM read in place: QEMU's memory tree and /proc/<pid>/maps to a RAM layout, and the reader itself over
crafted "guest RAM" in this very process (/proc/self/mem, pagemap), hostile kernel data walked through it."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from hostguard.memory import elfscan, guestram
from hostguard.memory.guestram import (
    PAGE,
    GuestRam,
    GuestRamError,
    MapEntry,
    RamRange,
    parse_flat_view,
    parse_maps,
    parse_ramblocks,
    ram_layout,
    zero_pfns,
)
from hostguard.memory.kernelranges import bounce_buffer_range, page_array_ranges
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.walk import MemoryFault, Walker, WalkLimits
from tests.testbed.prereq import require, require_root
from tests.unit.memory_fakes import elf_header
from tests.unit.test_memory_walk import LAYOUT, FakeKernel

GIB = 1 << 30
# `info mtree -f` of a 6 GiB pc-i440fx-7.2 guest (QEMU 7.2), shortened: RAM split below/above the PCI hole
MTREE = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): pc.ram @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): pc.ram @00000000000f0000
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000
  00000000febf8000-00000000febf8fff (prio 0, i/o): virtio-pci-common-virtio-blk
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-00000001bfffffff (prio 0, ram): pc.ram @00000000c0000000

FlatView #2
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000ffffffff (prio 0, ram): smram
"""
RAMBLOCK = """              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000180000000 0x0000000180000000
                 pc.bios    4 KiB  0x0000000180000000 0x0000000000040000 0x0000000000040000
"""
MAPS = """5577022da000-557702683000 rw-p 00de3000 fe:00 2171028                    /usr/bin/qemu-system-x86_64
7f60f3d00000-7f60f3e00000 rw-p 00000000 00:00 0
7f60f3e00000-7f6273e00000 rw-p 00000000 00:00 0
7f6273e00000-7f6273e01000 ---p 00000000 00:00 0
7f6274000000-7f62b3fff000 rwxp 00000000 00:00 0
"""
HVA = 0x7F60F3E00000


def test_qemu_memory_tree_maps_ram_above_4g_to_the_right_offset() -> None:
    flat = parse_flat_view(MTREE)
    assert [r.block for r in flat].count("pc.ram") == 6 and "smram" not in {r.block for r in flat}
    ranges, anonymous = ram_layout(flat, parse_ramblocks(RAMBLOCK), parse_maps(MAPS))
    assert anonymous
    assert sum(r.size for r in ranges) == 6 * GIB  # ROM-mapped pc.ram included; pc.bios and I/O not
    high = ranges[-1]
    assert (high.gpa, high.size, high.hva) == (4 * GIB, 3 * GIB, HVA + 3 * GIB)  # pc.ram @0xc0000000
    low = next(r for r in ranges if r.gpa == 0x100000)
    assert low.hva == HVA + 0x100000 and low.gpa + low.size == 3 * GIB


def test_layout_refuses_what_it_cannot_place() -> None:
    flat = parse_flat_view(MTREE)
    blocks = parse_ramblocks(RAMBLOCK)
    twin = MAPS + "7f0000000000-7f0180000000 rw-p 00000000 00:00 0\n"  # another mapping of the RAM's size
    with pytest.raises(GuestRamError, match="2 mappings of that size"):
        ram_layout(flat, blocks, parse_maps(twin))
    with pytest.raises(GuestRamError, match="0 mappings"):
        ram_layout(flat, blocks, parse_maps(MAPS.replace("7f6273e00000 rw-p", "7f6273e00000 r--p")))
    with pytest.raises(GuestRamError, match="not in QEMU's block list"):
        ram_layout(flat, {}, parse_maps(MAPS))
    small = {"pc.ram": GIB}  # a flat view that puts RAM past the end of its block
    big = [MapEntry(HVA, HVA + GIB, "rw-p", 0, 0, "")]
    with pytest.raises(GuestRamError, match="outside RAM block"):
        ram_layout(flat, small, big)
    with pytest.raises(GuestRamError, match="no flat view"):
        parse_flat_view(MTREE.replace('"memory"', '"other"'))
    with pytest.raises(GuestRamError, match="no RAM"):
        ram_layout(parse_flat_view(MTREE.replace("ram)", "i/o)")), blocks, parse_maps(MAPS))


def test_shared_or_file_backed_ram_is_not_called_anonymous() -> None:
    memfd = MAPS.replace(
        "7f6273e00000 rw-p 00000000 00:00 0", "7f6273e00000 rw-s 00000000 00:01 4242 /memfd:pc.ram (deleted)"
    )
    _, anonymous = ram_layout(parse_flat_view(MTREE), parse_ramblocks(RAMBLOCK), parse_maps(memfd))
    assert not anonymous  # pagemap's "not present" does not mean zeros there: scans read it all


# --- the reader, over crafted RAM in this process -----------------------------------------------------------


class Crafted:
    """Two "RAM" areas of this process, at guest-physical 0 and 4 GiB (a hole between, as around the PCI
    hole), read through GuestRam via /proc/self."""

    def __init__(self, low_pages: int = 64, high_pages: int = 64) -> None:
        self.low = mmap.mmap(-1, low_pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.high = mmap.mmap(-1, high_pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ranges = [
            RamRange(0, len(self.low), elfscan_address(self.low), "pc.ram"),
            RamRange(4 * GIB, len(self.high), elfscan_address(self.high), "pc.ram"),
        ]
        self.ram = GuestRam(os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY), os.getpid(), ranges, True)

    def put(self, gpa: int, data: bytes) -> None:
        area, offset = (self.high, gpa - 4 * GIB) if gpa >= 4 * GIB else (self.low, gpa)
        area[offset : offset + len(data)] = data

    def close(self) -> None:
        self.ram.close()


def elfscan_address(area: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(area))


def kernel_has_pagemap_scan() -> bool:
    with mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as area:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            guestram._scan_works.clear()
            return guestram._pagemap_scan_works(fd, elfscan_address(area))
        finally:
            os.close(fd)
            guestram._scan_works.clear()


@pytest.fixture(params=["pagemap-scan", "pagemap-read"])
def how(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each reader test twice: with the kernel's PAGEMAP_SCAN (6.7+) and with pagemap read page by page."""
    if request.param == "pagemap-scan":
        require(kernel_has_pagemap_scan(), f"this kernel ({os.uname().release}) has no PAGEMAP_SCAN (Linux 6.7+)")
    monkeypatch.setattr(guestram, "_scan_works", [request.param == "pagemap-scan"])
    return str(request.param)


@pytest.fixture
def crafted(how: str) -> Iterator[Crafted]:
    c = Crafted()
    yield c
    c.close()


def test_reads_inside_ram_and_faults_outside(crafted: Crafted) -> None:
    crafted.put(0x1000, b"low page")
    crafted.put(4 * GIB + 0x2000, b"high page")
    assert crafted.ram.read(0x1000, 8) == b"low page"
    assert crafted.ram.read(4 * GIB + 0x2000, 9) == b"high page"
    for gpa, size in ((64 * PAGE, 1), (64 * PAGE - 4, 8), (3 * GIB, 8), (4 * GIB + 64 * PAGE, 1), (1 << 60, 8)):
        with pytest.raises(MemoryFault, match="not RAM"):
            crafted.ram.read(gpa, size)


def test_scans_read_only_pages_that_hold_something(crafted: Crafted) -> None:
    crafted.put(5 * PAGE, elf_header(fill=b"x" * 100))
    crafted.put(4 * GIB + 9 * PAGE, elf_header(e_type=2))
    crafted.put(4 * GIB + 10 * PAGE, b"\x7fELF not a header")
    chunks = list(crafted.ram.chunks())
    covered = sum(len(d) for _, d in chunks)
    assert covered == 3 * PAGE, [(hex(a), len(d)) for a, d in chunks]  # 125 pages were never touched
    heads = list(crafted.ram.page_heads(elfscan.ELF_MAGIC))
    assert [a for a, _ in heads] == [5 * PAGE, 4 * GIB + 9 * PAGE, 4 * GIB + 10 * PAGE]
    pages = elfscan.judge_pages(heads, (4 * GIB, 4 * GIB + PAGE * 16), 100)
    assert [(p.address, p.e_type, p.in_kernel_image) for p in pages] == [
        (5 * PAGE, "dyn", False),
        (4 * GIB + 9 * PAGE, "exec", True),
    ]
    assert pages == elfscan.scan_chunks(chunks, kernel_image=(4 * GIB, 4 * GIB + PAGE * 16))


def test_pages_only_read_are_the_zero_page_and_are_skipped(crafted: Crafted) -> None:
    require_root()  # PFNs in pagemap need CAP_SYS_ADMIN
    assert zero_pfns() is not None
    crafted.put(3 * PAGE, b"data")
    _ = crafted.low[20 * PAGE], crafted.high[0]  # reads map the shared zero page: "present" in pagemap
    assert [(a, len(d)) for a, d in crafted.ram.chunks()] == [(3 * PAGE, PAGE)]


def test_both_ways_of_reading_pagemap_find_the_same_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Written pages, pages only read (the zero page), a written and a read-only huge page, runs across the
    edge of one PAGEMAP_SCAN call (3 regions per call here): the kernel's runs are exactly pagemap's."""
    require_root()  # zero-page PFNs in pagemap need CAP_SYS_ADMIN
    require(kernel_has_pagemap_scan(), f"this kernel ({os.uname().release}) has no PAGEMAP_SCAN (Linux 6.7+)")
    huge = 2 << 20
    area = mmap.mmap(-1, 8 * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = elfscan_address(area)
    aligned = (base + huge - 1) & ~(huge - 1)
    try:
        area.madvise(mmap.MADV_HUGEPAGE, aligned - base, 4 * huge)
        _ = area[aligned - base]  # the huge zero page, where THP is allowed
        area[aligned - base + huge + 7] = 1  # a written huge page
        small = aligned - base + 5 * huge
        for page in (0, 1, 2, 4, 6, 7, 9, 11, 12, 30):
            area[small + page * PAGE] = 0x5A
        for page in (3, 5, 8, 10, 31):
            _ = area[small + page * PAGE]  # read only: the zero page
        ram = GuestRam(os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY), os.getpid(), [], True)
        r = RamRange(0, len(area), base, "pc.ram")
        monkeypatch.setattr(guestram, "SCAN_REGIONS", 3)
        try:
            monkeypatch.setattr(guestram, "_scan_works", [False])
            read = list(ram.present_runs(r))
            monkeypatch.setattr(guestram, "_scan_works", [True])
            scanned = list(ram.present_runs(r))
        finally:
            ram.close()
    finally:
        area.close()
    assert scanned == read, (scanned, read)
    assert (small + 9 * PAGE, PAGE) in read and (small + 11 * PAGE, 2 * PAGE) in read  # zero pages split runs


def test_scan_of_an_ended_process_fails_not_hangs(crafted: Crafted) -> None:
    crafted.put(0, elf_header())
    crafted.ram.start_time += 1  # as if the pid now named another process
    with pytest.raises(GuestRamError, match="ended"):
        list(crafted.ram.page_heads(elfscan.ELF_MAGIC))


def test_frozen_reads_come_from_pages_already_read(crafted: Crafted) -> None:
    crafted.put(PAGE, b"before")
    with crafted.ram.frozen():
        assert crafted.ram.read(PAGE, 6) == b"before"
        crafted.put(PAGE, b"after!")  # the guest is paused: nothing changes; a cached page is served
        assert crafted.ram.read(PAGE + 1, 5) == b"efore"
        assert crafted.ram.read(PAGE - 2, 8) == bytes(2) + b"after!"  # across pages: read through
    assert crafted.ram.read(PAGE, 6) == b"after!"


# --- hostile kernel data, walked through the reader -----------------------------------------------------------

DIRECT_MAP = 0xFFFF888000000000


class DirectMapped:
    """Kernel virtual = guest physical + DIRECT_MAP (x86-64's direct map), over GuestRam."""

    def __init__(self, crafted: Crafted) -> None:
        self.crafted = crafted  # keeps its areas mapped
        self.ram = crafted.ram
        self.reads = 0

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        if address < DIRECT_MAP:
            raise MemoryFault(f"{address:#x} is not in the direct map")
        return self.ram.read(address - DIRECT_MAP, size)


def walk_in_ram(k: FakeKernel, limits: WalkLimits | None = None) -> tuple[Walker, DirectMapped]:
    """Copy the fake kernel's objects into crafted guest RAM and walk them there."""
    size = k.mem.next - DIRECT_MAP
    ram = Crafted(low_pages=size // PAGE + 1, high_pages=1)
    for address, data in k.mem.chunks.items():
        ram.put(address - DIRECT_MAP, bytes(data))
    mem = DirectMapped(ram)
    return Walker(mem, LAYOUT, limits), mem


def test_a_clean_kernel_walks_the_same_through_the_reader() -> None:
    k = FakeKernel()
    init = k.task(1, b"init", exe=k.file(*k.path(b"bin", b"busybox", ino=15, nlink=2)))
    k.task(108, b"sleep", exe=k.file(*k.path(b"usr", b"bin", b"sleep", ino=16)), parent=init)
    k.module(b"ext4")
    w, _ = walk_in_ram(k)
    procs = {p.pid: p for p in w.processes(k.init_task)}
    assert procs[1].exe is not None and procs[1].exe.path == "/bin/busybox"
    assert procs[108].exe is not None and procs[108].exe.path == "/usr/bin/sleep" and procs[108].ppid == 1
    assert [m.name for m in w.modules(k.modules_head)] == ["ext4"] and w.anomalies == []


def test_hostile_lists_pointers_outside_ram_and_absurd_counts_stay_bounded() -> None:
    k = FakeKernel()
    a = k.task(1, b"a")
    dentry = k.dentry(b"x", None, k.inode(9, 1, k.ext4))
    k.mem.put(dentry + 0x20, "IIQ", 0, 0xFFFFFFFF, DIRECT_MAP + (1 << 40))  # qstr: absurd length, name outside RAM
    k.task(3, b"c", exe=k.file(k.root_mnt + 0x20, dentry))
    b = k.task(2, b"b")
    k.mem.put(b + 0x10, "Q", a + 0x10)  # a loop that never returns to init_task
    m = k.module(b"ok")
    k.mem.put(m + 8, "Q", 0xFFFFFFFFFFFFF000)  # module list next: the top of the address space
    w, mem = walk_in_ram(k)
    procs = w.processes(k.init_task)
    assert [p.pid for p in procs] == [1, 3, 2]
    assert procs[1].status == "unreadable" and "out of range" in (procs[1].problem or "")
    assert [x.name for x in w.modules(k.modules_head)] == ["ok"]
    assert any("cycle" in x for x in w.anomalies) and any("module list is broken" in x for x in w.anomalies)
    assert mem.reads < 200

    k2 = FakeKernel()
    t = k2.task(7, b"outside")
    k2.mem.put(t + 0x10, "Q", DIRECT_MAP + (64 << 30))  # next: guest physical 64 GiB, not RAM
    w2, _ = walk_in_ram(k2)
    assert [p.pid for p in w2.processes(k2.init_task)] == [7]
    assert any("not RAM" in x for x in w2.anomalies)

    k3 = FakeKernel()
    for pid in range(1, 40):
        k3.task(pid, b"p")
    w3, _ = walk_in_ram(k3, WalkLimits(max_tasks=16))
    assert len(w3.processes(k3.init_task)) == 16 and any("more than 16" in x for x in w3.anomalies)


def test_unreadable_executable_through_the_reader_is_a_per_process_problem() -> None:
    k = FakeKernel()
    f = k.mem.alloc(0x40)
    k.mem.put(f + 0x10, "QQ", DIRECT_MAP + (1 << 45), DIRECT_MAP + (1 << 45))
    k.task(5, b"garbage", exe=f)
    w, _ = walk_in_ram(k)
    (p,) = w.processes(k.init_task)
    assert p.status == "unreadable" and "not RAM" in (p.problem or "")


# --- the guest kernel's page array: not scanned for ELF headers ---------------------------------------------

VMEMMAP = 0xFFFF_EA00_0000_0000
TOP, PUD_TABLE, PMD_TABLE, PTE_TABLE = 0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000
PHYS_BASE = 0x20_0000
MIB2 = 1 << 21


class PageTables:
    """Guest-physical memory holding x86-64 4-level page tables for the vmemmap, read as the ELF scan reads."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}  # 8-byte entries by address

    def set(self, table: int, index: int, value: int) -> None:
        self.mem[table + 8 * index] = value

    def read(self, address: int, size: int) -> bytes:
        if address >= 1 << 40:
            raise MemoryFault(f"guest physical address {address:#x} is not RAM")
        return b"".join(self.mem.get(address + i, 0).to_bytes(8, "little") for i in range(0, size, 8))

    def info(self, drop: str = "", **extra: str) -> VmcoreInfo:
        top_symbol = TOP - PHYS_BASE + 0xFFFF_FFFF_8000_0000
        fields = {
            "OSRELEASE": "6.1.0",
            "KERNELOFFSET": "10000000",
            "SYMBOL(vmemmap)": f"{VMEMMAP:x}",
            "SYMBOL(init_top_pgt)": f"{top_symbol:x}",
            "NUMBER(phys_base)": str(PHYS_BASE),
            "SIZE(page)": "64",
            "NUMBER(pgtable_l5_enabled)": "0",
            **extra,
        }
        fields.pop(drop, None)
        return VmcoreInfo("".join(f"{k}={v}\n" for k, v in fields.items()).encode(), fields, "scan")


def vmemmap_tables(leaves: list[int], *, small_at: int | None = None) -> PageTables:
    """The vmemmap's first PMD entries mapping 2 MiB each at `leaves` (guest-physical), and at index
    `small_at` a 4 KiB-page table instead (as the kernel leaves after remapping part of it)."""
    t = PageTables()
    t.set(TOP, (VMEMMAP >> 39) & 511, PUD_TABLE | 0x63)
    t.set(PUD_TABLE, (VMEMMAP >> 30) & 511, PMD_TABLE | 0x63)
    for i, phys in enumerate(leaves):
        t.set(PMD_TABLE, i, phys | 0x1E3 if i != small_at else PTE_TABLE | 0x63)
    return t


def test_page_array_of_the_guest_kernel_is_found_through_its_page_tables() -> None:
    # 4 GiB of RAM: 1 Mi struct pages of 64 bytes, 64 MiB of page array, 32 mappings of 2 MiB
    leaves = [0x1_0000_0000 - 64 * MIB2 + i * MIB2 for i in range(32)]  # contiguous, below 4 GiB
    t = vmemmap_tables(leaves)
    assert page_array_ranges(t.read, t.info(), 4 * GIB) == [(leaves[0], leaves[-1] + MIB2)]
    # x86-64's VMCOREINFO has no SYMBOL(vmemmap): the kernel variable vmemmap_base (KASLR) says where it is,
    # its address from the signed kernel file; without that symbol, the fixed VMEMMAP_START
    link = 0xFFFF_FFFF_8300_0000
    variable = link + 0x1000_0000 - 0xFFFF_FFFF_8000_0000 + PHYS_BASE
    t.mem[variable] = VMEMMAP
    no_symbol = t.info(drop="SYMBOL(vmemmap)")
    assert page_array_ranges(t.read, no_symbol, 4 * GIB, link) == [(leaves[0], leaves[-1] + MIB2)]
    assert page_array_ranges(t.read, no_symbol, 4 * GIB) == [(leaves[0], leaves[-1] + MIB2)]
    t.mem[variable] = 0x1234_5000  # not a kernel address: nothing skipped
    assert page_array_ranges(t.read, no_symbol, 4 * GIB, link) == []


def test_page_array_parts_mapped_with_small_pages_are_not_skipped() -> None:
    leaves = [0x8000_0000 + i * MIB2 for i in range(32)]
    t = vmemmap_tables(leaves, small_at=5)
    assert page_array_ranges(t.read, t.info(), 4 * GIB) == [(leaves[0], leaves[5]), (leaves[6], leaves[-1] + MIB2)]


@pytest.mark.parametrize(
    "why",
    [
        "five-level paging",
        "no page-table root",
        "a mapping past the end of RAM",
        "page tables outside RAM",
    ],
)
def test_page_array_that_does_not_look_as_expected_skips_nothing(why: str) -> None:
    """Anything unexpected: the ELF scan reads every page (the skip list is empty), never less."""
    leaves = [0x8000_0000 + i * MIB2 for i in range(32)]
    t = vmemmap_tables(leaves)
    info = t.info()
    if why == "five-level paging":
        info = t.info(**{"NUMBER(pgtable_l5_enabled)": "1"})
    elif why == "no page-table root":
        info = t.info(drop="SYMBOL(init_top_pgt)")
    elif why == "a mapping past the end of RAM":
        t.set(PMD_TABLE, 3, 0x2_0000_0000 | 0x1E3)
    else:
        t.set(PUD_TABLE, (VMEMMAP >> 30) & 511, (1 << 41) | 0x63)
    assert page_array_ranges(t.read, info, 4 * GIB) == []


def test_elf_scan_skips_the_page_array_ranges_only(crafted: Crafted) -> None:
    crafted.put(5 * PAGE, elf_header())
    crafted.put(8 * PAGE, elf_header())
    crafted.put(4 * GIB + 9 * PAGE, elf_header())
    skip = [(4 * PAGE, 6 * PAGE), (4 * GIB, 4 * GIB + 10 * PAGE)]
    assert [a for a, _ in crafted.ram.page_heads(elfscan.ELF_MAGIC, skip)] == [8 * PAGE]


def bounce_info(kernel_offset: int = 0x1000_0000) -> VmcoreInfo:
    text = f"OSRELEASE=6.1.0\nKERNELOFFSET={kernel_offset:x}\nNUMBER(phys_base)={PHYS_BASE}\n"
    return VmcoreInfo(text.encode(), dict(line.split("=", 1) for line in text.splitlines()), "scan")


def test_bounce_buffer_is_placed_from_the_kernel_files_symbol() -> None:
    """io_tlb_default_mem's address comes from the signed kernel file (link-time) plus KASLR; its first two
    fields are the bounce buffer's guest-physical start and end."""
    link = 0xFFFF_FFFF_8300_0000
    t = PageTables()
    where = link + 0x1000_0000 - 0xFFFF_FFFF_8000_0000 + PHYS_BASE
    t.mem[where], t.mem[where + 8] = 0xBC00_0000, 0xC000_0000
    assert bounce_buffer_range(t.read, bounce_info(), link, 5 * GIB) == [(0xBC00_0000, 0xC000_0000)]


@pytest.mark.parametrize(
    "start_end",
    [(0xC000_0000, 0xBC00_0000), (0xBC00_0100, 0xC000_0000), (0, 2 * GIB), (0xBC00_0000, 9 * GIB), (0, 0)],
)
def test_bounce_buffer_that_does_not_look_right_skips_nothing(start_end: tuple[int, int]) -> None:
    """Reversed, unaligned, over 1 GiB, past the end of RAM, or a pointer-era layout's zeros: nothing skipped."""
    link = 0xFFFF_FFFF_8300_0000
    t = PageTables()
    where = link + 0x1000_0000 - 0xFFFF_FFFF_8000_0000 + PHYS_BASE
    t.mem[where], t.mem[where + 8] = start_end
    assert bounce_buffer_range(t.read, bounce_info(), link, 5 * GIB) == []
    assert bounce_buffer_range(t.read, bounce_info(), None, 5 * GIB) == []  # an older kernel without the symbol
