"""The ELF page scan on synthetic ELF core dumps, and the per-kernel vDSO baseline store."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from hostguard.errors import FormatError, HostguardError
from hostguard.memory import elfscan
from hostguard.memory.elfscan import BaselineStore, baseline_candidates, head_page_sha256, is_elf_program_header
from hostguard.memory.model import ElfPage
from tests.unit.memory_fakes import elf_core, elf_header

PAGE = 4096


def memory_with(pages: dict[int, bytes], size: int = 64 * PAGE) -> bytes:
    mem = bytearray(size)
    for offset, data in pages.items():
        mem[offset : offset + len(data)] = data
    return bytes(mem)


def test_headers_are_checked_like_a_loader_would() -> None:
    assert is_elf_program_header(elf_header(3)) == ("dyn", 62, 2)
    assert is_elf_program_header(elf_header(2, machine=3, elf_class=1)) == ("exec", 3, 1)
    assert is_elf_program_header(elf_header(1)) is None  # ET_REL: a kernel module, not a program
    assert is_elf_program_header(elf_header(4)) is None  # a core file
    assert is_elf_program_header(b"\x7fELF" + bytes(60)) is None
    bad_version = bytearray(elf_header(3))
    bad_version[20] = 2
    assert is_elf_program_header(bytes(bad_version)) is None
    bad_ehsize = bytearray(elf_header(3))
    bad_ehsize[52] = 40
    assert is_elf_program_header(bytes(bad_ehsize)) is None
    assert is_elf_program_header(b"\x7fELF") is None


@pytest.mark.parametrize("misalign", [0, 0x180])
def test_scan_finds_page_aligned_headers_only(tmp_path: Path, misalign: int) -> None:
    prog = elf_header(2, fill=b"program text")
    lib = elf_header(3, elf_class=1, machine=3)
    mem = memory_with(
        {
            3 * PAGE: prog,
            10 * PAGE: lib,
            12 * PAGE + 100: elf_header(3),  # not at a page start: ignored
            20 * PAGE: elf_header(1),  # a module: ignored
            30 * PAGE: b"\x7fELF garbage",
        }
    )
    high = memory_with({PAGE: prog}, 4 * PAGE)
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, mem), (0x100000000, high)], misalign=misalign))
    pages = elfscan.scan_dump(dump, kernel_image=(10 * PAGE, 11 * PAGE))
    assert [(p.address, p.e_type, p.in_kernel_image) for p in pages] == [
        (3 * PAGE, "exec", False),
        (10 * PAGE, "dyn", True),
        (0x100000000 + PAGE, "exec", False),
    ]
    assert pages[0].sha256 == head_page_sha256(prog) == hashlib.sha256(prog.ljust(PAGE, b"\0")).hexdigest()
    assert pages[0].sha256 == pages[2].sha256


def test_a_segment_starting_off_a_page_boundary_is_scanned_at_physical_page_starts(tmp_path: Path) -> None:
    data = bytearray(8 * PAGE)
    data[PAGE - 0x200 : PAGE - 0x200 + 64] = elf_header(3)[:64]  # physical 0x...0e00 + 0x200 = page start
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0x200, bytes(data))]))
    pages = elfscan.scan_dump(dump)
    assert [p.address for p in pages] == [PAGE]


def test_scan_crosses_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elfscan, "CHUNK", 4 * PAGE)
    mem = memory_with({3 * PAGE: elf_header(3), 4 * PAGE: elf_header(2), 9 * PAGE: elf_header(3)}, 10 * PAGE)
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, mem)]))
    assert [p.address for p in elfscan.scan_dump(dump)] == [3 * PAGE, 4 * PAGE, 9 * PAGE]


def test_hostile_dumps_are_format_errors(tmp_path: Path) -> None:
    dump = tmp_path / "core"
    dump.write_bytes(b"not an elf" * 10)
    with pytest.raises(FormatError, match="not an ELF64 core"):
        elfscan.scan_dump(dump)
    core = bytearray(elf_core([(0, bytes(2 * PAGE))]))
    core[32:40] = (1 << 40).to_bytes(8, "little")  # program headers far outside the file
    dump.write_bytes(core)
    with pytest.raises(FormatError, match="program header table"):
        elfscan.scan_dump(dump)
    truncated = elf_core([(0, bytes(4 * PAGE))])[: -2 * PAGE]
    dump.write_bytes(truncated)
    with pytest.raises(FormatError, match="outside the file"):
        elfscan.scan_dump(dump)
    many = memory_with({i * PAGE: elf_header(3) for i in range(8)}, 8 * PAGE)
    dump.write_bytes(elf_core([(0, many)]))
    with pytest.raises(FormatError, match="more than 4"):
        elfscan.scan_dump(dump, max_hits=4)


def test_kernel_physical_range_follows_x86_64_pa_symbol() -> None:
    # values from a real boot: KERNELOFFSET=0x16400000, NUMBER(phys_base)=-239075328
    start, end = elfscan.kernel_physical_range(0xFFFFFFFF81000000, 0xFFFFFFFF828EB000, 0x16400000, -239075328)
    assert start == 0x9000000 and end == 0x9000000 + 0x18EB000


def test_baseline_store_round_trip_merge_and_permissions(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path / "baselines")
    kernel = "e" * 64
    assert store.load(kernel) is None
    store.record(kernel, {"1" * 64})
    merged = store.record(kernel, {"2" * 64})
    assert merged.pages == {"1" * 64, "2" * 64} == store.load(kernel).pages  # type: ignore[union-attr]
    path = tmp_path / "baselines" / f"{kernel}.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with pytest.raises(FormatError):
        store.load("../../etc/passwd")
    path.write_text('{"schema": 1, "kernel_sha256": "x", "pages": []}')
    with pytest.raises(HostguardError, match="malformed"):
        store.load(kernel)
    path.write_text("{nope")
    with pytest.raises(HostguardError, match="unreadable"):
        store.load(kernel)


def test_baseline_candidates_are_unknown_pages_inside_the_kernel_image() -> None:
    pages = [
        ElfPage(1, "dyn", 62, 2, "v" * 64, True),
        ElfPage(2, "dyn", 62, 2, "k" * 64, True),
        ElfPage(3, "exec", 62, 2, "u" * 64, False),
    ]
    assert baseline_candidates(pages, {"k" * 64}) == {"v" * 64}
