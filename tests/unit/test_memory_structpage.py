"""What the guest kernel uses a page for, read from its `struct page` array (hostguard.memory.structpage).

The 6.1 layout is the one the Debian 12 guest kernel (6.1.0-57-amd64) publishes in its VMCOREINFO, read from
a running test guest: SIZE(page)=64, OFFSET(page.flags)=0, OFFSET(page.compound_head)=8,
OFFSET(page._mapcount)=48, OFFSET(page._refcount)=52, NUMBER(PG_slab)=9. The page-type encodings of 6.10 and
6.12 are those kernels' (PG_slab 0x1000 under the base 0xf0000000; PGTY_slab 0xf5 in the top byte).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hostguard.errors import FormatError
from hostguard.memory import structpage, vmcoreinfo
from hostguard.memory.judge import compare_memory, elf_page_unlisted
from hostguard.memory.live import DumpSource
from hostguard.memory.model import PAGE_FREE, PAGE_IN_USE, PAGE_SLAB, PAGE_UNKNOWN, ElfPage, MemorySnapshot
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.vmlinux import START_KERNEL_MAP
from hostguard.memory.walk import MemoryFault
from hostguard.signed.findings import UNLISTED_ELF
from tests.unit.memory_fakes import elf_core, elf_header

PAGE = 4096
GIB = 1 << 30
VMEMMAP = 0xFFFF_EA00_0000_0000
PHYS_BASE = 0x20_0000
TOP, PUD, PMD, PTE = 0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000
ARRAY = 0x4000_0000  # guest-physical home of the page array (mapped with 4 KiB pages here)
RAM_END = 1 * GIB
PG_SLAB_61 = 9
LRU = 1 << 4

LINUX_6_1 = {
    "SIZE(page)": "64",
    "OFFSET(page.flags)": "0",
    "OFFSET(page.compound_head)": "8",
    "OFFSET(page._mapcount)": "48",
    "OFFSET(page._refcount)": "52",
    "NUMBER(PG_slab)": str(PG_SLAB_61),
}
LINUX_6_10 = {k: v for k, v in LINUX_6_1.items() if k != "NUMBER(PG_slab)"} | {
    "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)": str(~0x1000)
}
LINUX_6_12 = LINUX_6_10 | {"NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)": str(0xF5 << 24)}


class Memory:
    """Sparse guest-physical memory: page tables that map the page array with 4 KiB pages, and the array."""

    def __init__(self, size: int = 64) -> None:
        self.pages: dict[int, bytearray] = {}
        self.size = size
        self.reads = 0
        self.put(TOP + 8 * ((VMEMMAP >> 39) & 511), struct.pack("<Q", PUD | 0x63))
        self.put(PUD + 8 * ((VMEMMAP >> 30) & 511), struct.pack("<Q", PMD | 0x63))
        self.put(PMD + 8 * ((VMEMMAP >> 21) & 511), struct.pack("<Q", PTE | 0x63))

    def put(self, address: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.pages.setdefault((address + i) // PAGE * PAGE, bytearray(PAGE))[(address + i) % PAGE] = b

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        if address + size > RAM_END + 2 * GIB or address < 0:
            raise MemoryFault(f"{address:#x} is not RAM")
        out = bytearray()
        for a in range(address, address + size):
            out.append(self.pages.get(a // PAGE * PAGE, bytearray(PAGE))[a % PAGE])
        return bytes(out)

    def map_array_page(self, index: int, frame: int) -> None:
        """Page `index` of the page array at guest-physical `frame`."""
        self.put(PTE + 8 * index, struct.pack("<Q", frame | 0x63))

    def descriptor(
        self, pfn: int, *, flags: int = 0, head: int = 0, mapcount: int = 0xFFFF_FFFF, refcount: int = 1
    ) -> None:
        va = VMEMMAP + pfn * self.size
        index = (va - VMEMMAP) // PAGE
        for i in range(index, (va + self.size - 1 - VMEMMAP) // PAGE + 1):
            if not self.pages.get(PTE + 8 * i // PAGE * PAGE, bytearray(PAGE))[8 * i % PAGE]:
                self.map_array_page(i, ARRAY + i * PAGE)
        data = bytearray(self.size)
        struct.pack_into("<QQ", data, 0, flags, head)
        struct.pack_into("<II", data, 48, mapcount, refcount)
        self.write_virtual(va, bytes(data))

    def write_virtual(self, va: int, data: bytes) -> None:
        for i, b in enumerate(data):
            a = va + i
            index = (a - VMEMMAP) // PAGE
            frame = int.from_bytes(self.read(PTE + 8 * index, 8), "little") & structpage.TABLE
            self.put(frame + a % PAGE, bytes([b]))


def info(fields: dict[str, str], **extra: str) -> VmcoreInfo:
    top_symbol = TOP - PHYS_BASE + START_KERNEL_MAP
    merged = {
        "OSRELEASE": "6.1.0",
        "KERNELOFFSET": "0",
        "SYMBOL(vmemmap)": f"{VMEMMAP:x}",
        "SYMBOL(init_top_pgt)": f"{top_symbol:x}",
        "NUMBER(phys_base)": str(PHYS_BASE),
        "NUMBER(pgtable_l5_enabled)": "0",
        **fields,
        **extra,
    }
    merged = {k: v for k, v in merged.items() if v != "-"}
    return VmcoreInfo("".join(f"{k}={v}\n" for k, v in merged.items()).encode(), merged, "scan")


def uses(mem: Memory, vmci: VmcoreInfo, *pfns: int) -> list[str]:
    got = structpage.page_uses(mem.read, vmci, [p * PAGE for p in pfns], RAM_END)
    return [got[p * PAGE] for p in pfns]


def head_of(pfn: int, size: int = 64) -> int:
    return VMEMMAP + pfn * size + 1


def test_linux_6_1_slab_free_and_in_use_pages_including_tails_of_compound_pages() -> None:
    mem = Memory()
    mem.descriptor(100, flags=1 << PG_SLAB_61)  # an order-0 slab (kmalloc-64)
    mem.descriptor(200, flags=(1 << PG_SLAB_61) | (1 << 16))  # the head of an order-3 slab (kmalloc-4k)
    for tail in range(201, 208):
        mem.descriptor(tail, head=head_of(200), refcount=0)  # tails: no flags, refcount 0
    mem.descriptor(300, flags=LRU, refcount=2)  # page cache
    mem.descriptor(301, refcount=0)  # free
    mem.descriptor(400, flags=LRU | (1 << 16))  # a large folio of the page cache
    mem.descriptor(401, head=head_of(400), refcount=0)
    assert uses(mem, info(LINUX_6_1), 100, 200, 203, 207, 300, 301, 400, 401) == [
        PAGE_SLAB,
        PAGE_SLAB,
        PAGE_SLAB,
        PAGE_SLAB,
        PAGE_IN_USE,
        PAGE_FREE,
        PAGE_IN_USE,
        PAGE_IN_USE,
    ]


@pytest.mark.parametrize("fields", [LINUX_6_10, LINUX_6_12], ids=["6.10", "6.12"])
def test_later_kernels_mark_slab_as_a_page_type(fields: dict[str, str]) -> None:
    slab_type = 0xFFFF_EFFF if fields is LINUX_6_10 else 0xF500_0000
    buddy_type = 0xFFFF_FF7F if fields is LINUX_6_10 else 0xF000_0000
    mem = Memory()
    mem.descriptor(10, mapcount=slab_type)
    mem.descriptor(11, head=head_of(10), refcount=0)
    mem.descriptor(12, flags=1 << PG_SLAB_61)  # bit 9 is no longer "slab": an ordinary page
    mem.descriptor(13, mapcount=buddy_type, refcount=0)
    mem.descriptor(14, mapcount=0, flags=LRU)  # mapped once
    assert uses(mem, info(fields), 10, 11, 12, 13, 14) == [PAGE_SLAB, PAGE_SLAB, PAGE_IN_USE, PAGE_FREE, PAGE_IN_USE]


def test_6_12_value_published_as_a_negative_int_reads_the_same() -> None:
    mem = Memory()
    mem.descriptor(10, mapcount=0xF500_0000)
    negative = info(LINUX_6_12, **{"NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)": str((0xF5 << 24) - (1 << 32))})
    assert uses(mem, negative, 10) == [PAGE_SLAB]


def test_a_descriptor_that_crosses_a_page_of_the_array_is_read_from_both_frames() -> None:
    mem = Memory(size=80)  # 4096 / 80 is not whole: descriptor 51 spans array pages 0 and 1
    mem.map_array_page(0, ARRAY + 7 * PAGE)
    mem.map_array_page(1, ARRAY + 3 * PAGE)  # not after page 0 in guest-physical memory
    mem.descriptor(51, flags=1 << PG_SLAB_61)
    mem.descriptor(52, refcount=0)
    vmci = info(LINUX_6_1, **{"SIZE(page)": "80"})
    assert uses(mem, vmci, 51, 52) == [PAGE_SLAB, PAGE_FREE]


@pytest.mark.parametrize(
    "garbled",
    [
        "head outside the array",
        "head not on a descriptor",
        "head after its tail",
        "head too far away",
        "head is the page itself",
        "array not mapped",
        "page past the end of RAM",
    ],
)
def test_a_garbled_page_array_hides_nothing(garbled: str) -> None:
    """What cannot be read or does not fit is UNKNOWN: the page is judged as if nothing were known."""
    mem = Memory()
    mem.descriptor(5000, flags=1 << PG_SLAB_61)
    pfn = 5001
    head = {
        "head outside the array": VMEMMAP - 64 + 1,
        "head not on a descriptor": VMEMMAP + 5000 * 64 + 8 + 1,
        "head after its tail": head_of(5002),
        "head too far away": head_of(5001 - structpage.MAX_COMPOUND_PAGES),
        "head is the page itself": head_of(5001),
    }.get(garbled, head_of(5000))
    mem.descriptor(pfn, head=head, refcount=0)
    if garbled == "array not mapped":
        mem.put(PTE + 8 * (5001 * 64 // PAGE), bytes(8))
    if garbled == "page past the end of RAM":
        pfn = RAM_END // PAGE
    assert uses(mem, info(LINUX_6_1), pfn) == [PAGE_UNKNOWN]


@pytest.mark.parametrize(
    "extra",
    [
        {"SIZE(page)": "-"},
        {"OFFSET(page.compound_head)": "-"},
        {"OFFSET(page.flags)": "60"},
        {"SIZE(page)": "4096"},
        {"NUMBER(pgtable_l5_enabled)": "1"},
        {"SYMBOL(init_top_pgt)": "-"},
        {"SYMBOL(vmemmap)": "1234000"},
    ],
    ids=["no size", "no compound_head", "flags past the end", "absurd size", "5-level", "no top", "user address"],
)
def test_vmcoreinfo_without_what_is_needed_tells_nothing(extra: dict[str, str]) -> None:
    mem = Memory()
    mem.descriptor(7, flags=1 << PG_SLAB_61)
    mem.descriptor(8, refcount=0)
    assert uses(mem, info(LINUX_6_1, **extra), 7, 8) == [PAGE_UNKNOWN, PAGE_UNKNOWN]


def test_without_the_slab_number_or_refcount_offset_only_that_test_is_lost() -> None:
    mem = Memory()
    mem.descriptor(7, flags=1 << PG_SLAB_61)
    mem.descriptor(8, refcount=0)
    assert uses(mem, info(LINUX_6_1, **{"NUMBER(PG_slab)": "-"}), 7, 8) == [PAGE_IN_USE, PAGE_FREE]
    assert uses(mem, info(LINUX_6_1, **{"OFFSET(page._refcount)": "-"}), 7, 8) == [PAGE_SLAB, PAGE_IN_USE]
    # a page-type value that is no known encoding: slab cannot be told
    odd = info(LINUX_6_10, **{"NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)": str(~0x1100)})
    mem.descriptor(9, mapcount=0xFFFF_EEFF)
    assert uses(mem, odd, 9) == [PAGE_IN_USE]


def test_the_kernels_own_vmemmap_base_variable_places_the_array() -> None:
    """x86-64's VMCOREINFO has no SYMBOL(vmemmap): the KASLR'd `vmemmap_base` variable is read, at its
    link-time address from the signed kernel file."""
    mem = Memory()
    mem.descriptor(3, flags=1 << PG_SLAB_61)
    link = 0xFFFF_FFFF_8300_0000
    mem.put(link - START_KERNEL_MAP + PHYS_BASE, struct.pack("<Q", VMEMMAP))
    vmci = info(LINUX_6_1, **{"SYMBOL(vmemmap)": "-"})
    assert structpage.page_uses(mem.read, vmci, [3 * PAGE], RAM_END, link) == {3 * PAGE: PAGE_SLAB}


def elf(address: int, use: str = PAGE_UNKNOWN, digest: str = "u" * 64) -> ElfPage:
    return ElfPage(address, "dyn", 62, 2, digest, False, use)


def test_the_judge_does_not_count_slab_or_free_pages_and_still_counts_the_rest() -> None:
    known = {"k" * 64}
    assert not elf_page_unlisted(elf(1, PAGE_SLAB), known, None)
    assert not elf_page_unlisted(elf(1, PAGE_FREE), known, None)
    assert elf_page_unlisted(elf(1, PAGE_IN_USE), known, None)
    assert elf_page_unlisted(elf(1, PAGE_UNKNOWN), known, None)  # not read, or unreadable: judged
    snapshot = MemorySnapshot("6.1.0", None, "note", "kernel-file", "kernel-file", (), ())
    pages = [elf(0x1000, PAGE_SLAB, "a" * 64), elf(0x2000, PAGE_FREE, "b" * 64), elf(0x3000, PAGE_IN_USE, "c" * 64)]
    findings = compare_memory((), snapshot, elf_pages=pages, known_heads=known, baseline=frozenset())
    assert [(f.kind, f.path) for f in findings] == [(UNLISTED_ELF, "elf:" + "c" * 64)]
    assert "(slab page)" in pages[0].describe() and pages[0].to_json()["use"] == "slab"


def test_with_uses_reads_only_the_pages_it_is_given() -> None:
    mem = Memory()
    mem.descriptor(100, flags=1 << PG_SLAB_61)
    pages = structpage.with_uses([elf(100 * PAGE)], mem.read, info(LINUX_6_1), RAM_END)
    assert [p.use for p in pages] == [PAGE_SLAB]
    mem.reads = 0
    assert structpage.with_uses([], mem.read, info(LINUX_6_1), RAM_END) == [] and mem.reads == 0
    assert structpage.with_uses([elf(1)], mem.read, None, RAM_END) == [elf(1)]


def test_the_dump_fallback_reads_the_same_page_array_from_the_dump(tmp_path: Path) -> None:
    mem = Memory()
    mem.descriptor(100, flags=1 << PG_SLAB_61)
    mem.descriptor(300, flags=LRU, refcount=2)
    mem.put(100 * PAGE, elf_header())
    mem.put(300 * PAGE, elf_header())
    dump = tmp_path / "core"
    dump.write_bytes(elf_core(sorted((a, bytes(p)) for a, p in mem.pages.items())))
    source = DumpSource(dump)
    pages = source.elf_pages((0, 0), {})
    assert [p.address for p in pages] == [100 * PAGE, 300 * PAGE]
    confirmed = source.confirm_elf_pages(pages, (0, 0), info(LINUX_6_1), {})
    assert [p.use for p in confirmed] == [PAGE_SLAB, PAGE_IN_USE]


def test_a_guest_process_cannot_plant_a_vmcoreinfo_that_makes_its_elf_page_slab() -> None:
    """The attack on this check from inside the guest, short of its kernel: write a VMCOREINFO look-alike whose
    NUMBER(PG_slab) is a bit every page-cache page has (PG_lru), so that an unlisted program's page reads as
    slab. The kernel's own copy is in memory too: the copies disagree, and the memory check is unavailable
    (a note, policy decides), never a page skipped on the planted numbers."""
    kernel = info(LINUX_6_1, **{"BUILD-ID": "ab" * 20, "KERNELOFFSET": "1000000"})
    planted = dict(kernel.fields, **{"NUMBER(PG_slab)": "4"})
    found = vmcoreinfo.Candidates(expected_build_id="ab" * 20)
    found.consider(0x1000, kernel.raw)
    found.consider(0x9000, "".join(f"{k}={v}\n" for k, v in planted.items()).encode())
    with pytest.raises(FormatError, match="disagree"):
        found.choice()
    mem = Memory()
    mem.descriptor(300, flags=LRU, refcount=2)  # what the planted numbers would have called slab
    assert uses(mem, kernel, 300) == [PAGE_IN_USE]
    assert uses(mem, info(planted), 300) == [PAGE_SLAB]
