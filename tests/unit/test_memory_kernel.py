"""Kernel files: vmlinux out of bzImage payloads, ELF parsing, kallsyms decoding, the facts cache."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from hostguard.errors import FormatError
from hostguard.memory import kernel as kernelmod
from hostguard.memory import vmlinux as vmlinuxmod
from hostguard.memory.kallsyms import decode_kallsyms, symbols_from_file
from hostguard.memory.vmcoreinfo import NOTE_SOURCE, VmcoreInfo, parse
from hostguard.memory.vmlinux import Vmlinux, extract_vmlinux
from tests.testbed.prereq import require

TEXT = 0xFFFFFFFF81000000
BUILD_ID = bytes(range(20))
KASLR = 0x16400000


# --- a synthetic vmlinux -----------------------------------------------------------------------------------------


def kallsyms_blob(symbols: list[tuple[str, int]], base: int) -> tuple[bytes, dict[str, int]]:
    """The kallsyms tables for `symbols` ((name, address) sorted by address), with the identity token table
    (token i is the single byte i), laid out one after another; returns the blob and each table's offset."""
    names = b""
    for name, _addr in symbols:
        encoded = b"T" + name.encode()
        n = len(encoded)
        names += (bytes([n]) if n < 0x80 else bytes([0x80 | (n & 0x7F), n >> 7])) + encoded
    offsets = b"".join(
        struct.pack("<i", addr if addr < base else base - 1 - addr)
        for _name, addr in symbols  # absolute percpu
    )
    token_table = b"".join(bytes([i]) + b"\0" for i in range(256))
    token_index = struct.pack("<256H", *range(0, 512, 2))
    parts = {
        "kallsyms_num_syms": struct.pack("<I", len(symbols)).ljust(8, b"\0"),
        "kallsyms_relative_base": struct.pack("<Q", base),
        "kallsyms_offsets": offsets.ljust(-(-len(offsets) // 8) * 8, b"\0"),
        "kallsyms_names": names.ljust(-(-len(names) // 8) * 8, b"\0"),
        "kallsyms_token_table": token_table,
        "kallsyms_token_index": token_index,
    }
    blob = b""
    where = {}
    for name, data in parts.items():
        where[name] = len(blob)
        blob += data
    return blob, where


SYMBOLS = [
    ("fixed_percpu_data", 0x0),  # per-cpu: an absolute value
    ("_text", TEXT),
    ("_stext", TEXT),
    ("x" * 200, TEXT + 0x10),  # a "big" symbol name (2-byte length)
    ("__start_rodata", TEXT + 0x1000000),
    ("__end_rodata", TEXT + 0x18EB000),
    ("init_task", TEXT + 0x1A1AA40),
    ("modules", TEXT + 0x1B292A0),
    ("init_uts_ns", TEXT + 0x1BFB000),
    ("_end", TEXT + 0x3430000),
]


def make_vmlinux(
    *, btf: bytes | None = b"\x9f\xeb\x01\x00" + bytes(20), with_kallsyms: bool = True
) -> tuple[bytes, dict[str, int]]:
    """An ELF64 vmlinux: one PT_LOAD at TEXT holding kallsyms tables, a GNU build-id note, sections."""
    tables, where = kallsyms_blob(SYMBOLS, TEXT) if with_kallsyms else (b"", {})
    note = struct.pack("<III", 4, len(BUILD_ID), 3) + b"GNU\0" + BUILD_ID
    load = (bytes(0x1000) + tables).ljust(0x4000, b"\0")
    sections: list[tuple[str, int, bytes]] = [(".text", 1, load)]
    if btf is not None:
        sections.append((".BTF", 1, btf))
    sections.append((".notes", 7, note))
    shstr = b"\0" + b"".join(n.encode() + b"\0" for n, _t, _d in sections) + b".shstrtab\0"
    sections.append((".shstrtab", 3, shstr))
    phnum = 2
    data_off = 0x1000
    body = b""
    offsets = []
    for _n, _t, d in sections:
        offsets.append(data_off + len(body))
        body += d.ljust(-(-len(d) // 16) * 16, b"\0")
    shoff = data_off + len(body)
    load_off, note_off = offsets[0], offsets[-2]
    ph = struct.pack("<IIQQQQQQ", 1, 5, load_off, TEXT, TEXT - 0xFFFFFFFF80000000, len(load), len(load), 0x200000)
    ph += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    shdrs = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    name_pos = 1
    for (name, sh_type, d), off in zip(sections, offsets, strict=True):
        addr = TEXT if name == ".text" else 0
        shdrs += struct.pack("<IIQQQQIIQQ", name_pos, sh_type, 2, addr, off, len(d), 0, 0, 1, 0)
        name_pos += len(name) + 1
    ehdr = (
        b"\x7fELF"
        + bytes([2, 1, 1])
        + bytes(9)
        + struct.pack(
            "<HHIQQQIHHHHHH", 2, 62, 1, TEXT, 64, shoff, 0, 64, 56, phnum, 64, len(sections) + 1, len(sections)
        )
    )
    image = (ehdr + ph).ljust(data_off, b"\0") + body + shdrs
    return image, {k: TEXT + 0x1000 + v for k, v in where.items()}


def vmcoreinfo_for(tables: dict[str, int], stext: int = TEXT) -> VmcoreInfo:
    lines = ["OSRELEASE=6.1.0-test", f"BUILD-ID={BUILD_ID.hex()}", f"SYMBOL(_stext)={stext + KASLR:x}"]
    lines += [f"SYMBOL({k})={v + KASLR:x}" for k, v in tables.items()]
    lines += [f"KERNELOFFSET={KASLR:x}", "NUMBER(phys_base)=0"]
    return parse(("\n".join(lines) + "\n").encode(), NOTE_SOURCE)


def bzimage(payload: bytes) -> bytes:
    setup = bytearray(1024)
    setup[0x1F1] = 1  # one setup sector after the boot sector: the protected-mode part starts at 1024
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    return bytes(setup) + bytes(0x100) + payload + b"trailer!"


def zstd_compress(data: bytes) -> bytes | None:
    import shutil
    import subprocess

    tool = shutil.which("zstd")
    return (
        None if tool is None else subprocess.run([tool, "-q", "-c"], input=data, capture_output=True, check=True).stdout
    )


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "xz", "lzma", "bzip2", "zstd", "elf"])
def test_extract_vmlinux_from_each_payload_format(tmp_path: Path, codec: str) -> None:
    image, _ = make_vmlinux()
    codecs: dict[str, Callable[[bytes], bytes | None]] = {
        "gzip": lambda d: gzip.compress(d, mtime=0),
        "xz": lzma.compress,
        "bzip2": bz2.compress,
        "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
        "zstd": zstd_compress,
        "elf": lambda d: d,
    }
    packed = codecs[codec](image)
    require(packed is not None, "the zstd tool is not installed")
    assert packed is not None
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(packed if codec == "elf" else bzimage(packed))
    out = io.BytesIO()
    extract_vmlinux(kernel, out)
    assert out.getvalue() == image


def test_extract_refuses_bad_kernels(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"MZ" + bytes(4096))
    with pytest.raises(FormatError, match="neither a bzImage"):
        extract_vmlinux(kernel, io.BytesIO())
    image, _ = make_vmlinux()
    good = bzimage(gzip.compress(image))
    kernel.write_bytes(good[: len(good) // 2])
    with pytest.raises(FormatError, match="outside the file"):
        extract_vmlinux(kernel, io.BytesIO())
    lz4 = bzimage(b"\x02\x21\x4c\x18" + bytes(64))
    kernel.write_bytes(lz4)
    with pytest.raises(FormatError, match="lz4 compressed payload is not supported"):
        extract_vmlinux(kernel, io.BytesIO())
    cut = bytearray(bzimage(lzma.compress(image)))
    struct.pack_into("<I", cut, 0x24C, 200)  # payload_length shorter than the stream
    kernel.write_bytes(bytes(cut))
    with pytest.raises(FormatError, match="truncated"):
        extract_vmlinux(kernel, io.BytesIO())


def test_extraction_output_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmlinuxmod, "MAX_VMLINUX", 1 << 20)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(gzip.compress(bytes(8 << 20))))  # a decompression bomb, in small
    with pytest.raises(FormatError, match="larger than"):
        extract_vmlinux(kernel, io.BytesIO())


def test_vmlinux_sections_build_id_and_extent() -> None:
    image, _ = make_vmlinux()
    v = Vmlinux(image)
    assert v.build_id() == BUILD_ID.hex()
    assert v.section(".BTF") is not None and v.section(".nope") is None
    assert v.image_extent() == (TEXT, TEXT + 0x4000)
    assert v.read_virtual(TEXT, 4) == bytes(4)
    with pytest.raises(FormatError, match="not in the file"):
        v.read_virtual(TEXT + 0x3FFE, 8)


@pytest.mark.parametrize("patch", [(32, b"\xff" * 8), (40, b"\xff" * 8), (0, b"\x7fELX")])
def test_vmlinux_refuses_malformed_headers(patch: tuple[int, bytes]) -> None:
    image = bytearray(make_vmlinux()[0])
    image[patch[0] : patch[0] + len(patch[1])] = patch[1]
    with pytest.raises(FormatError):
        Vmlinux(bytes(image))


def test_kallsyms_decode_from_the_file() -> None:
    image, tables = make_vmlinux()
    v = Vmlinux(image)
    found = decode_kallsyms(v.read_virtual, tables, ["init_task", "x" * 200, "fixed_percpu_data", "missing"])
    assert found == {"init_task": TEXT + 0x1A1AA40, "x" * 200: TEXT + 0x10, "fixed_percpu_data": 0}
    symbols = symbols_from_file(v, vmcoreinfo_for(tables), ["init_task", "modules"], ["init_task"])
    assert symbols["init_task"] == TEXT + 0x1A1AA40 and symbols["_stext"] == TEXT


def test_kallsyms_must_agree_with_vmcoreinfo() -> None:
    image, tables = make_vmlinux()
    with pytest.raises(FormatError, match="disagree"):
        symbols_from_file(Vmlinux(image), vmcoreinfo_for(tables, stext=TEXT + 0x1000), ["init_task"], [])
    with pytest.raises(FormatError, match="no symbol nothere"):
        symbols_from_file(Vmlinux(image), vmcoreinfo_for(tables), ["init_task"], ["nothere"])
    no_tables = parse(b"OSRELEASE=x\nKERNELOFFSET=0\n", NOTE_SOURCE)
    with pytest.raises(FormatError, match=r"Linux < 6\.0"):
        symbols_from_file(Vmlinux(image), no_tables, ["init_task"], [])


def test_kallsyms_counts_are_bounded() -> None:
    image, tables = make_vmlinux()
    v = Vmlinux(image)
    with pytest.raises(FormatError, match="implausible"):
        decode_kallsyms(v.read_virtual, tables, ["init_task"], max_symbols=3)


def test_facts_without_btf_and_with_broken_btf(tmp_path: Path) -> None:
    image, tables = make_vmlinux(btf=None)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(gzip.compress(image)))
    facts = kernelmod.load_facts(kernel, vmcoreinfo_for(tables), tmp_path / "cache")
    assert facts.layout is None and "no .BTF section" in (facts.btf_problem or "")
    assert facts.build_id == BUILD_ID.hex() and facts.symbols["init_task"] == TEXT + 0x1A1AA40
    assert kernelmod.image_range(facts) == (TEXT + 0x1000000, TEXT + 0x18EB000)

    image2, tables2 = make_vmlinux(btf=b"\x9f\xeb\x01\x00" + b"\xff" * 20)
    kernel.write_bytes(bzimage(gzip.compress(image2)))
    facts2 = kernelmod.load_facts(kernel, vmcoreinfo_for(tables2), tmp_path / "cache")
    assert facts2.layout is None and "unusable" in (facts2.btf_problem or "")


def test_facts_cache_is_used_and_bad_caches_are_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, tables = make_vmlinux(btf=None)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(gzip.compress(image)))
    info = vmcoreinfo_for(tables)
    first = kernelmod.load_facts(kernel, info, tmp_path / "cache")
    cache = tmp_path / "cache" / f"{first.sha256}.json"
    assert json.loads(cache.read_text())["schema"] == kernelmod.CACHE_SCHEMA
    assert (cache.stat().st_mode & 0o777) == 0o600 and (cache.parent.stat().st_mode & 0o777) == 0o700

    def boom(*_a: object) -> None:
        raise AssertionError("decompressed again despite the cache")

    monkeypatch.setattr(kernelmod, "extract_vmlinux", boom)
    assert kernelmod.load_facts(kernel, info, tmp_path / "cache") == first
    monkeypatch.undo()
    cache.write_text('{"schema": 1}')
    assert kernelmod.load_facts(kernel, info, tmp_path / "cache") == first
    cache.write_text("not json")
    assert kernelmod.load_facts(kernel, info, tmp_path / "cache") == first
    # facts made without VMCOREINFO have no symbols and are not trusted to stand in for ones with
    cache.unlink()
    without = kernelmod.load_facts(kernel, None, tmp_path / "cache")
    assert without.symbols == {} and kernelmod.load_facts(kernel, info, tmp_path / "cache").symbols


def test_the_installed_debian_kernel(tmp_path: Path) -> None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    require(bool(kernels), "no kernel in /boot (install linux-image-amd64)")
    facts = kernelmod.load_facts(kernels[-1], None, tmp_path)
    assert facts.build_id is not None and len(facts.build_id) == 40
    assert facts.layout is not None, facts.btf_problem
    assert 0 < facts.layout["task_struct.tasks"] < facts.layout["sizeof:task_struct"]
    assert facts.layout["len:task_struct.comm"] == 16 and facts.layout["list_head.prev"] == 8
    assert facts.image_start == TEXT


def test_truncated_zstd_payload_is_refused(tmp_path: Path) -> None:
    image, _ = make_vmlinux()
    packed = zstd_compress(image)
    require(packed is not None, "zstd tool not installed")
    assert packed is not None
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(packed + struct.pack("<I", len(image))))  # as the kernel's size_append does
    out = io.BytesIO()
    extract_vmlinux(kernel, out)
    assert out.getvalue() == image
    kernel.write_bytes(bzimage(packed[: len(packed) // 2]))
    with pytest.raises(FormatError, match="zstd failed"):
        extract_vmlinux(kernel, io.BytesIO())
