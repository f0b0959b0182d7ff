"""ELF header pages found by a scan of a running guest are read again with the guest paused before they can be
findings (LiveSource.confirm_elf_pages): a page the guest was filling while it was read is no file's page."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hostguard.memory import elfscan
from hostguard.memory.live import LiveGuest, LiveSource
from hostguard.memory.model import PAGE_IN_USE, PAGE_SLAB
from hostguard.memory.walk import MemoryFault
from tests.testbed.prereq import require_module
from tests.unit.test_memory_structpage import LINUX_6_1, PG_SLAB_61, RAM_END, Memory, info

libvirt = require_module("libvirt")


def elf_page(fill: bytes) -> bytes:
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHI", 3, 62, 1)  # ELF64 LE dyn x86-64
    header += bytes(52 - len(header)) + struct.pack("<H", 64)
    return (header + fill * 4096)[: elfscan.PAGE]


class Ram:
    """Guest RAM as the paused guest holds it; records whether it was read while the domain was paused.
    `backing`: where reads of other addresses go (the kernel's page tables and page array)."""

    def __init__(self, dom: Any, pages: dict[int, bytes], backing: Memory | None = None) -> None:
        self.dom, self.pages, self.backing = dom, pages, backing
        self.reads = self.paused_reads = self.bytes_read = 0
        self.ranges, self.end = [SimpleNamespace(gpa=0, size=RAM_END)], RAM_END

    def read(self, gpa: int, size: int) -> bytes:
        self.reads += 1
        self.paused_reads += self.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        if gpa in self.pages:
            return self.pages[gpa][:size]
        if self.backing is None:
            raise MemoryFault(f"{gpa:#x} is not RAM")
        return self.backing.read(gpa, size)


@pytest.fixture
def dom() -> Iterator[Any]:
    conn = libvirt.open("test:///default")
    yield conn.lookupByName("test")
    conn.close()


def source(dom: Any, ram: Ram, tmp_path: Path, pause: str = "on-inconsistency") -> LiveSource:
    guest = LiveGuest(key=("uuid", 1, 1), ram=ram)  # type: ignore[arg-type]
    return LiveSource(guest=guest, dom=dom, marker_dir=tmp_path, pause=pause)


def judged(addresses_pages: dict[int, bytes]) -> list[Any]:
    return elfscan.judge_pages(addresses_pages.items(), (0, 0), elfscan.MAX_HITS)


NO_PAGE_ARRAY = info({})  # VMCOREINFO without struct page offsets: no page's use can be told


def confirm(src: LiveSource, pages: list[Any], vmci: Any = NO_PAGE_ARRAY) -> list[Any]:
    return src.confirm_elf_pages(pages, (0, 0), vmci, {})


def test_a_page_read_while_it_was_filled_is_judged_as_it_reads_paused(dom: Any, tmp_path: Path) -> None:
    whole, torn = elf_page(b"A"), elf_page(b"A")[:2048] + bytes(2048)
    unknown = elf_page(b"Z")
    ram = Ram(dom, {0x1000: whole, 0x2000: unknown, 0x3000: bytes(4096)})
    scanned = judged({0x1000: torn, 0x2000: unknown, 0x3000: elf_page(b"Q")})  # the running scan's reads
    confirmed = confirm(source(dom, ram, tmp_path), scanned)
    assert {p.address: p.sha256 for p in confirmed} == {
        0x1000: hashlib.sha256(whole).hexdigest(),  # the file's page it was becoming
        0x2000: hashlib.sha256(unknown).hexdigest(),  # still unknown: still a finding
    }  # 0x3000 is no ELF header page any more
    assert ram.paused_reads == ram.reads >= 3
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []


def test_a_page_that_cannot_be_read_again_stays_and_pausing_off_reads_nothing(dom: Any, tmp_path: Path) -> None:
    page = elf_page(b"Z")
    scanned = judged({0x5000: page})
    ram = Ram(dom, {})
    assert confirm(source(dom, ram, tmp_path), scanned) == scanned  # kept: fail closed
    never = Ram(dom, {0x5000: bytes(4096)})
    assert confirm(source(dom, never, tmp_path, pause="never"), scanned) == scanned
    assert never.paused_reads == 0


def test_in_the_same_pause_the_guest_kernels_page_array_says_which_pages_are_slab(dom: Any, tmp_path: Path) -> None:
    """The page re-read paused and its `struct page` are one moment: a slab page keeps a stale ELF header of
    the page-cache page it was (the Debian guest's false finding), and is not judged."""
    memory = Memory()
    memory.descriptor(100, flags=1 << PG_SLAB_61)
    memory.descriptor(300, flags=1 << 4, refcount=2)
    slab, cached = elf_page(b"J"), elf_page(b"Z")
    ram = Ram(dom, {100 * 4096: slab, 300 * 4096: cached}, backing=memory)
    scanned = judged({100 * 4096: slab, 300 * 4096: cached})
    confirmed = confirm(source(dom, ram, tmp_path), scanned, info(LINUX_6_1))
    assert {p.address // 4096: p.use for p in confirmed} == {100: PAGE_SLAB, 300: PAGE_IN_USE}
    assert ram.paused_reads == ram.reads > 2  # page tables and descriptors read in the pause, too
    never = Ram(dom, {100 * 4096: slab}, backing=memory)
    confirmed = confirm(source(dom, never, tmp_path, pause="never"), judged({100 * 4096: slab}), info(LINUX_6_1))
    assert [p.use for p in confirmed] == [PAGE_SLAB] and never.paused_reads == 0
