"""ELF header pages found by a scan of a running guest are read again with the guest paused before they can be
findings (LiveSource.confirm_elf_pages): a page the guest was filling while it was read is no file's page."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.memory import elfscan
from hostguard.memory.live import LiveGuest, LiveSource
from hostguard.memory.walk import MemoryFault
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")


def elf_page(fill: bytes) -> bytes:
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHI", 3, 62, 1)  # ELF64 LE dyn x86-64
    header += bytes(52 - len(header)) + struct.pack("<H", 64)
    return (header + fill * 4096)[: elfscan.PAGE]


class Ram:
    """Guest RAM as the paused guest holds it; records whether it was read while the domain was paused."""

    def __init__(self, dom: Any, pages: dict[int, bytes]) -> None:
        self.dom, self.pages, self.paused_reads, self.bytes_read = dom, pages, 0, 0

    def read(self, gpa: int, size: int) -> bytes:
        if gpa not in self.pages:
            raise MemoryFault(f"{gpa:#x} is not RAM")
        self.paused_reads += self.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        return self.pages[gpa][:size]


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


def test_a_page_read_while_it_was_filled_is_judged_as_it_reads_paused(dom: Any, tmp_path: Path) -> None:
    whole, torn = elf_page(b"A"), elf_page(b"A")[:2048] + bytes(2048)
    unknown = elf_page(b"Z")
    ram = Ram(dom, {0x1000: whole, 0x2000: unknown, 0x3000: bytes(4096)})
    scanned = judged({0x1000: torn, 0x2000: unknown, 0x3000: elf_page(b"Q")})  # the running scan's reads
    confirmed = source(dom, ram, tmp_path).confirm_elf_pages(scanned, (0, 0))
    assert {p.address: p.sha256 for p in confirmed} == {
        0x1000: hashlib.sha256(whole).hexdigest(),  # the file's page it was becoming
        0x2000: hashlib.sha256(unknown).hexdigest(),  # still unknown: still a finding
    }  # 0x3000 is no ELF header page any more
    assert ram.paused_reads == 3
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []


def test_a_page_that_cannot_be_read_again_stays_and_pausing_off_reads_nothing(dom: Any, tmp_path: Path) -> None:
    page = elf_page(b"Z")
    scanned = judged({0x5000: page})
    ram = Ram(dom, {})
    assert source(dom, ram, tmp_path).confirm_elf_pages(scanned, (0, 0)) == scanned  # kept: fail closed
    never = Ram(dom, {0x5000: bytes(4096)})
    assert source(dom, never, tmp_path, pause="never").confirm_elf_pages(scanned, (0, 0)) == scanned
    assert never.paused_reads == 0
