"""Guest-physical ranges the in-place ELF scan need not read: the guest kernel's own structures whose size
follows the guest's RAM (ADR 0025). Found at each check in guest memory; anything unexpected gives no range,
and the scan then reads everything."""

from __future__ import annotations

import array
import struct
from collections.abc import Callable

from hostguard.memory.structpage import (
    PAGE,
    PHYS_1G,
    PHYS_2M,
    PTE_PRESENT,
    PTE_PS,
    TABLE,
    entry,
    kernel_top_table,
    symbol_physical,
    vmemmap_address,
)
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.walk import MemoryFault

MAX_PAGE_ARRAY = 1 << 34  # 16 GiB of struct pages (a 1 TiB guest): beyond that, nothing is skipped


def page_array_ranges(
    read: Callable[[int, int], bytes], info: VmcoreInfo, ram_end: int, vmemmap_base: int | None = None
) -> list[tuple[int, int]]:
    """Guest-physical (start, end) ranges that hold the guest kernel's `struct page` array (the vmemmap), found
    through the kernel's own page tables: the 2 MiB and 1 GiB mappings of [vmemmap, vmemmap + pages * SIZE(page)).
    Where the array starts: `SYMBOL(vmemmap)` when VMCOREINFO has it (x86-64's has not), else the kernel variable
    `vmemmap_base` (memory-region KASLR; `vmemmap_base`: its link-time address from the signed kernel file),
    else the fixed 4-level VMEMMAP_START.

    This array is the kernel's biggest per-GiB structure (1/64 of RAM, all of it written at boot), and only the
    kernel maps it: no program's file page can be there while it is mapped as the page array, so the ELF scan
    need not read it. Read at each check (the kernel remaps parts of it, e.g. for HugeTLB vmemmap
    optimisation, with 4 KiB mappings: those are not skipped). Anything unexpected (5-level paging, fields
    missing, an implausible size, a read outside RAM) gives no ranges: the scan then reads everything."""
    try:
        struct_size = int(info.fields.get("SIZE(page)", "64"))
    except ValueError:
        return []
    top = kernel_top_table(info)
    vmemmap = vmemmap_address(read, info, vmemmap_base) if top is not None else None
    if top is None or vmemmap is None or not 0 < struct_size <= 256:
        return []
    length = ram_end // PAGE * struct_size
    if length > MAX_PAGE_ARRAY:
        return []
    out: list[tuple[int, int]] = []
    try:
        va, end = vmemmap, vmemmap + length
        while va < end:
            pgd = entry(read, top, (va >> 39) & 511)
            if not pgd & PTE_PRESENT or pgd & PTE_PS:
                va = ((va >> 39) + 1) << 39
                continue
            pud = entry(read, pgd & TABLE, (va >> 30) & 511)
            if pud & PTE_PRESENT and pud & PTE_PS:
                base = (pud & PHYS_1G) + (va & ((1 << 30) - 1))
                step = min(end, ((va >> 30) + 1) << 30) - va
                out.append((base, base + step))
                va += step
                continue
            if not pud & PTE_PRESENT:
                va = ((va >> 30) + 1) << 30
                continue
            pmd_table = pud & TABLE
            pmds = array.array("Q", read(pmd_table, PAGE))
            while va < end:
                pmd = pmds[(va >> 21) & 511]
                if pmd & PTE_PRESENT and pmd & PTE_PS:
                    out.append((pmd & PHYS_2M, (pmd & PHYS_2M) + (1 << 21)))
                va = ((va >> 21) + 1) << 21
                if va & ((1 << 30) - 1) == 0:
                    break  # the next PUD entry
    except MemoryFault:
        return []
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(out):
        if hi > ram_end:
            return []  # a mapping past the end of RAM: not the page array as expected
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


MAX_BOUNCE_BUFFER = 1 << 30


def bounce_buffer_range(
    read: Callable[[int, int], bytes], info: VmcoreInfo, link_address: int | None, ram_end: int
) -> list[tuple[int, int]]:
    """The guest kernel's swiotlb bounce buffer as a guest-physical (start, end) range, or nothing.

    A kernel whose RAM reaches past 4 GiB sets aside 64 MiB below 4 GiB for devices that cannot address the
    rest, and zeroes it at boot: a per-size cost for the ELF scan, which it need not pay, since what passes
    through it is a copy of data the kernel also keeps in its own pages (scanned). `io_tlb_default_mem` (its
    address from the signed kernel file) starts with `phys_addr_t start, end` (struct io_tlb_mem in 5.16-6.5,
    its first member struct io_tlb_pool since). Anything implausible gives nothing: everything is read."""
    physical = symbol_physical(link_address, info) if link_address is not None else None
    if physical is None:
        return []
    try:
        start, end = struct.unpack("<QQ", read(physical, 16))
    except MemoryFault:
        return []
    if not (start < end <= ram_end and start % PAGE == 0 and end % PAGE == 0 and end - start <= MAX_BOUNCE_BUFFER):
        return []
    return [(start, end)]
