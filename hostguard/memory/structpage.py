"""What the guest kernel uses a page of its RAM for, read from the kernel's own `struct page` array.

The ELF scan judges a page by its bytes. A slab page, or a free one, keeps whatever was last written where
nothing has written since: on Debian guests, the copy of ld.so's ELF header that every dynamically linked
exec reads into a kmalloc-64 object and frees, at the start of its slab page, which hashes as no file's first
page. Nothing can run code from such a page (a process maps page-cache and anonymous pages, never slab or
free ones), so the scan does not judge it (docs/adr/0035-elf-scan-judges-pages-in-use.md).

Read the way makedumpfile reads it to filter dumps: offsets and flag numbers from VMCOREINFO, the array
(`vmemmap`) through the kernel's own page tables. A tail page of a compound page defers to its head. "Slab"
is, on the head: bit `NUMBER(PG_slab)` of `flags` (up to Linux 6.9); or a page type in `page_type` (the
`_mapcount` word), `NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)` being ~PG_slab under the 0xf0000000 base (6.10, 6.11)
or PGTY_slab << 24 in the top byte (6.12 on). "Free": the head's `_refcount` is 0. Whatever cannot be read or
does not fit gives UNKNOWN, and the page is judged as before: a guest that garbles its page array hides no
ELF page by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hostguard.memory.model import PAGE_FREE, PAGE_IN_USE, PAGE_SLAB, PAGE_UNKNOWN, ElfPage
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.vmlinux import START_KERNEL_MAP
from hostguard.memory.walk import MemoryFault
from hostguard.record import Record, replace

PAGE = 4096
VMEMMAP_START = 0xFFFF_EA00_0000_0000  # 4-level paging without memory-region KASLR
# x86-64 page-table entries (4-level paging): present, page size (a leaf above the last level), the frame
PTE_PRESENT, PTE_PS = 1, 1 << 7
TABLE, PHYS_2M, PHYS_1G = 0x000F_FFFF_FFFF_F000, 0x000F_FFFF_FFE0_0000, 0x000F_FFFF_C000_0000
MAX_COMPOUND_PAGES = 1 << 18  # a 1 GiB folio: a "head" further away than that is not one
_TYPE_BASE = 0xF000_0000  # page types before 6.12: a type is a cleared bit under this base


class PageLayout(Record):
    """Where `struct page` keeps what is read here, from VMCOREINFO."""

    size: int
    flags: int
    compound_head: int
    refcount: int | None
    page_type: int | None  # the `_mapcount` word
    pg_slab: int | None  # bit number in flags (up to 6.9)
    slab_type: int | None  # PAGE_SLAB_MAPCOUNT_VALUE as an unsigned 32-bit value (6.10 on)

    def is_slab(self, descriptor: bytes) -> bool:
        if self.slab_type is not None and self.page_type is not None:
            page_type = _u32(descriptor, self.page_type)
            if self.slab_type & 0x00FF_FFFF == 0:  # 6.12 on: the type is the top byte
                return page_type >> 24 == self.slab_type >> 24
            bit = ~self.slab_type & 0xFFFF_FFFF
            return page_type & (_TYPE_BASE | bit) == _TYPE_BASE
        return self.pg_slab is not None and bool(_u64(descriptor, self.flags) >> self.pg_slab & 1)


def page_layout(info: VmcoreInfo) -> PageLayout | None:
    """None when VMCOREINFO lacks what is needed to tell anything (then every page is judged)."""
    fields = info.fields

    def number(key: str) -> int | None:
        try:
            return int(fields[key])
        except (KeyError, ValueError):
            return None

    size, flags, head = number("SIZE(page)"), number("OFFSET(page.flags)"), number("OFFSET(page.compound_head)")
    refcount, page_type = number("OFFSET(page._refcount)"), number("OFFSET(page._mapcount)")
    pg_slab, slab_value = number("NUMBER(PG_slab)"), number("NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)")
    if size is None or flags is None or head is None or not 0 < size <= 256:
        return None
    if not (0 <= flags <= size - 8 and 0 <= head <= size - 8):
        return None
    if any(o is not None and not 0 <= o <= size - 4 for o in (refcount, page_type)):
        return None
    if pg_slab is not None and not 0 <= pg_slab < 64:
        pg_slab = None
    slab_type = slab_value & 0xFFFF_FFFF if slab_value is not None else None
    if slab_type is not None and not _plausible_slab_type(slab_type):
        slab_type = None
    return PageLayout(size, flags, head, refcount, page_type, pg_slab, slab_type)


def _plausible_slab_type(value: int) -> bool:
    if value & 0x00FF_FFFF == 0:
        return value >> 24 >= 0xF0  # PGTY_* values start at 0xf0
    bit = ~value & 0xFFFF_FFFF
    return bit != 0 and bit & (bit - 1) == 0 and bit < 0x1000_0000  # one cleared bit under the base


def kernel_top_table(info: VmcoreInfo) -> int | None:
    """Guest-physical address of the kernel's top-level page table (`init_top_pgt`)."""
    try:
        top = int(info.fields["SYMBOL(init_top_pgt)"], 16) - START_KERNEL_MAP + int(info.fields["NUMBER(phys_base)"])
    except (KeyError, ValueError):
        return None
    if info.fields.get("NUMBER(pgtable_l5_enabled)", "0") != "0" or top % PAGE or top < 0:
        return None
    return top


def symbol_physical(link_address: int, info: VmcoreInfo) -> int | None:
    """Guest-physical address of a kernel variable from its link-time address (the signed kernel file's
    symbol) and the running kernel's KASLR offset and phys_base; None without them."""
    if info.kernel_offset is None or info.phys_base is None:
        return None
    return link_address + info.kernel_offset - START_KERNEL_MAP + info.phys_base


def vmemmap_address(read: Callable[[int, int], bytes], info: VmcoreInfo, vmemmap_base: int | None) -> int | None:
    """Where the `struct page` array starts: `SYMBOL(vmemmap)` when VMCOREINFO has it (x86-64's has not), else
    the kernel variable `vmemmap_base` (memory-region KASLR; `vmemmap_base`: its link-time address from the
    signed kernel file), else the fixed 4-level VMEMMAP_START. None: not a plausible kernel address."""
    fields = info.fields
    try:
        if "SYMBOL(vmemmap)" in fields:
            vmemmap = int(fields["SYMBOL(vmemmap)"], 16)
        elif vmemmap_base is not None and (where := symbol_physical(vmemmap_base, info)) is not None:
            vmemmap = int.from_bytes(read(where, 8), "little")
        else:
            vmemmap = VMEMMAP_START
    except (ValueError, MemoryFault):
        return None
    return vmemmap if vmemmap >> 47 == 0x1FFFF else None


def entry(read: Callable[[int, int], bytes], table: int, index: int) -> int:
    return int.from_bytes(read(table + 8 * index, 8), "little")


def translate(read: Callable[[int, int], bytes], top: int, va: int) -> int:
    """Guest-physical address of kernel virtual address `va` through the 4-level tables at `top`."""
    pgd = entry(read, top, (va >> 39) & 511)
    if not pgd & PTE_PRESENT or pgd & PTE_PS:
        raise MemoryFault(f"{va:#x} is not mapped")
    pud = entry(read, pgd & TABLE, (va >> 30) & 511)
    if not pud & PTE_PRESENT:
        raise MemoryFault(f"{va:#x} is not mapped")
    if pud & PTE_PS:
        return (pud & PHYS_1G) | (va & ((1 << 30) - 1))
    pmd = entry(read, pud & TABLE, (va >> 21) & 511)
    if not pmd & PTE_PRESENT:
        raise MemoryFault(f"{va:#x} is not mapped")
    if pmd & PTE_PS:
        return (pmd & PHYS_2M) | (va & ((1 << 21) - 1))
    pte = entry(read, pmd & TABLE, (va >> 12) & 511)
    if not pte & PTE_PRESENT:
        raise MemoryFault(f"{va:#x} is not mapped")
    return (pte & TABLE) | (va & (PAGE - 1))


def page_uses(
    read: Callable[[int, int], bytes],
    info: VmcoreInfo,
    addresses: Iterable[int],
    ram_end: int,
    vmemmap_base: int | None = None,
) -> dict[int, str]:
    """For each guest-physical page address: PAGE_SLAB, PAGE_FREE, PAGE_IN_USE or PAGE_UNKNOWN. `read` reads
    guest-physical memory (MemoryFault outside RAM); `vmemmap_base` as for `vmemmap_address`."""
    wanted = list(addresses)
    layout, top = page_layout(info), kernel_top_table(info)
    vmemmap = vmemmap_address(read, info, vmemmap_base) if layout is not None and top is not None else None
    if layout is None or top is None or vmemmap is None:
        return dict.fromkeys(wanted, PAGE_UNKNOWN)
    pages = ram_end // PAGE

    def descriptor(pfn: int) -> bytes:
        va, out = vmemmap + pfn * layout.size, b""
        while len(out) < layout.size:  # a descriptor may cross a page of the array
            n = min(layout.size - len(out), PAGE - (va + len(out)) % PAGE)
            out += read(translate(read, top, va + len(out)), n)
        return out

    def use(pfn: int) -> str:
        if not 0 <= pfn < pages:
            return PAGE_UNKNOWN
        desc = descriptor(pfn)
        head = _u64(desc, layout.compound_head)
        if head & 1:  # a tail page: what it is used for is its head's
            offset = head - 1 - vmemmap
            head_pfn, rest = divmod(offset, layout.size)
            if rest or head_pfn < 0 or not 0 < pfn - head_pfn < MAX_COMPOUND_PAGES:
                return PAGE_UNKNOWN
            desc = descriptor(head_pfn)
        if layout.is_slab(desc):
            return PAGE_SLAB
        if layout.refcount is not None and _u32(desc, layout.refcount) == 0:
            return PAGE_FREE
        return PAGE_IN_USE

    out = {}
    for address in wanted:
        try:
            out[address] = use(address // PAGE)
        except MemoryFault:
            out[address] = PAGE_UNKNOWN
    return out


def with_uses(
    pages: list[ElfPage],
    read: Callable[[int, int], bytes],
    info: VmcoreInfo | None,
    ram_end: int,
    vmemmap_base: int | None = None,
) -> list[ElfPage]:
    """`pages`, each with what the guest kernel uses it for (`page_uses`)."""
    if not pages or info is None:
        return pages
    uses = page_uses(read, info, (p.address for p in pages), ram_end, vmemmap_base)
    return [replace(p, use=uses[p.address]) for p in pages]


def _u64(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 8], "little")


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")
