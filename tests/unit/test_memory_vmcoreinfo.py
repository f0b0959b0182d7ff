"""VMCOREINFO from the dump's ELF note, or from the kernel's in-memory copy, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostguard.errors import FormatError
from hostguard.memory import vmcoreinfo
from hostguard.memory.vmcoreinfo import NOTE_SOURCE, SCAN_SOURCE, parse
from tests.unit.memory_fakes import elf_core

BUILD_ID = "eb4fbcd037e7253717950bf2b93bd5566f47c56f"


def text(build_id: str = BUILD_ID, offset: str = "16400000", extra: str = "") -> bytes:
    return (
        f"OSRELEASE=6.1.0-56-amd64\nBUILD-ID={build_id}\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff98ffb000\n"
        f"SYMBOL(swapper_pg_dir)=ffffffff98e10000\nSYMBOL(_stext)=ffffffff97400000\n"
        f"SYMBOL(kallsyms_names)=ffffffff985bdac0\nSYMBOL(kallsyms_num_syms)=ffffffff985bdab8\n"
        f"SYMBOL(kallsyms_token_table)=ffffffff9872ddd8\nSYMBOL(kallsyms_token_index)=ffffffff9872e170\n"
        f"SYMBOL(kallsyms_offsets)=ffffffff985619c8\nSYMBOL(kallsyms_relative_base)=ffffffff985bdab0\n"
        f"NUMBER(phys_base)=-239075328\nKERNELOFFSET={offset}\n{extra}"
    ).encode()


def test_parse_fields() -> None:
    info = parse(text(), NOTE_SOURCE)
    assert info.osrelease == "6.1.0-56-amd64" and info.build_id == BUILD_ID
    assert info.kernel_offset == 0x16400000 and info.phys_base == -239075328 and info.page_size == 4096
    assert info.symbol("_stext") == 0xFFFFFFFF97400000 and info.symbol("nope") is None
    assert info.has_kallsyms


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"PAGESIZE=4096\n", "does not start with OSRELEASE"),
        (b"OSRELEASE=x\n\x1b[31mEVIL=1\n", "malformed line"),
        (b"OSRELEASE=x\nno equals sign\n", "malformed line"),
        (b"OSRELEASE=" + b"x" * 9000, "exceed"),
    ],
)
def test_parse_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse(raw, SCAN_SOURCE)


def test_odd_values_are_none_not_errors() -> None:
    info = parse(b"OSRELEASE=x\nKERNELOFFSET=zz\nNUMBER(phys_base)=1e9\nBUILD-ID=XYZ\nPAGESIZE=123\n", SCAN_SOURCE)
    assert info.kernel_offset is None and info.phys_base is None and info.build_id is None
    assert info.page_size == 4096 and not info.has_kallsyms


def test_first_duplicate_wins_and_nul_ends_the_text() -> None:
    info = parse(text(extra="KERNELOFFSET=0\n") + b"\0KERNELOFFSET=1\n", NOTE_SOURCE)
    assert info.kernel_offset == 0x16400000


def test_from_dump_prefers_the_note(tmp_path: Path) -> None:
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, text(offset="1234") + bytes(4096))], [(b"VMCOREINFO", 0, text())]))
    info = vmcoreinfo.from_dump(dump)
    assert info is not None and info.source == NOTE_SOURCE and info.kernel_offset == 0x16400000


def test_from_dump_falls_back_to_the_in_memory_copies(tmp_path: Path) -> None:
    memory = bytes(100) + text() + b"\0" + bytes(5000) + text(extra="CRASHTIME=1\n") + b"\0" + b"OSRELEASE=junk\0"
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, memory)], [(b"CORE", 1, b"x" * 8)]))
    info = vmcoreinfo.from_dump(dump)
    assert info is not None and info.source == SCAN_SOURCE and info.build_id == BUILD_ID
    assert "CRASHTIME" in info.fields  # the longest consistent copy


def test_contradicting_copies_need_the_expected_build_id(tmp_path: Path) -> None:
    other = "0" * 40
    memory = text() + b"\0" + bytes(64) + text(build_id=other, offset="2000000") + b"\0"
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, memory)]))
    with pytest.raises(FormatError, match="disagree"):
        vmcoreinfo.from_dump(dump)
    info = vmcoreinfo.from_dump(dump, expected_build_id=BUILD_ID)
    assert info is not None and info.kernel_offset == 0x16400000


def test_a_planted_copy_that_differs_in_any_line_makes_the_source_ambiguous(tmp_path: Path) -> None:
    planted = text().replace(b"NUMBER(phys_base)=-239075328", b"NUMBER(phys_base)=0")
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, text() + b"\0" + bytes(64) + planted + b"\0")]))
    with pytest.raises(FormatError, match="disagree"):
        vmcoreinfo.from_dump(dump, expected_build_id=BUILD_ID)


def test_no_vmcoreinfo_at_all(tmp_path: Path) -> None:
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, bytes(8192) + b"OSRELEASE=fragment only\0")]))
    assert vmcoreinfo.from_dump(dump) is None


def test_damaged_note_falls_back_to_memory(tmp_path: Path) -> None:
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, text() + b"\0")], [(b"VMCOREINFO", 0, b"garbage\n")]))
    info = vmcoreinfo.from_dump(dump)
    assert info is not None and info.source == SCAN_SOURCE
