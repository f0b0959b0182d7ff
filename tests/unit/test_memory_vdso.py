"""The kernel's own ELF pages from the signed kernel file: vDSO images found in a vmlinux's load segments, and
the running copy accepted only as the kernel patches it (alternative sites), nothing else."""

from __future__ import annotations

import struct

import pytest

from hostguard.errors import FormatError
from hostguard.memory.vdso import VdsoImage, matches, vdso_images

RDTSC_PADDED = bytes.fromhex("0f31909090")  # ALTERNATIVE_2("rdtsc", "lfence; rdtsc", ..., "rdtscp", ...)
LFENCE_RDTSC = bytes.fromhex("0faee80f31")
RDTSCP = bytes.fromhex("0f01f9")
TEXT = b"\x55\x48\x89\xe5" + RDTSC_PADDED + b"\x5d\xc3" + b"\xcc" * 6 + RDTSC_PADDED + b"\xc3"
SITES = (4, 17)


def vdso_elf(entsize: int = 12) -> bytes:
    """A little ELF64 ET_DYN like arch/x86/entry/vdso: .text with two rdtsc sites, their replacements and
    .altinstructions (struct alt_instr of `entsize` bytes), linked at 0 (addresses are file offsets)."""
    text_at = 0x100
    repl = LFENCE_RDTSC + RDTSCP
    repl_at = text_at + len(TEXT)
    alt_at = repl_at + len(repl)
    entries = b""
    for i, site in enumerate(x for s in SITES for x in (s, s)):
        at = alt_at + len(entries)
        r = repl_at if i % 2 == 0 else repl_at + len(LFENCE_RDTSC)
        rlen = len(LFENCE_RDTSC) if i % 2 == 0 else len(RDTSCP)
        flags = struct.pack("<H", 3) if entsize == 12 else struct.pack("<I", 3)
        entries += struct.pack("<ii", text_at + site - at, r - (at + 4)) + flags + bytes([5, rlen])
    names = b"\0.text\0.altinstr_replacement\0.altinstructions\0.shstrtab\0"
    names_at = alt_at + len(entries)
    sh_at = (names_at + len(names) + 7) & ~7
    body = bytearray(sh_at)
    body[text_at : text_at + len(TEXT)] = TEXT
    body[repl_at : repl_at + len(repl)] = repl
    body[alt_at : alt_at + len(entries)] = entries
    body[names_at : names_at + len(names)] = names

    def sh(name: bytes, sh_type: int, at: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", names.index(name), sh_type, 0, at, at, size, 0, 0, 1, 0)

    sections = [
        bytes(64),
        sh(b".text\0", 1, text_at, len(TEXT)),
        sh(b".altinstr_replacement\0", 1, repl_at, len(repl)),
        sh(b".altinstructions\0", 1, alt_at, len(entries)),
        sh(b".shstrtab\0", 3, names_at, len(names)),
    ]
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sh_at, 0, 64, 56, 0, 64, len(sections), 4)
    body[:64] = header
    return bytes(body) + b"".join(sections)


def kernel_with(image: bytes) -> tuple[list[tuple[int, int, int, int, int]], bytes]:
    """(segments, data) of a vmlinux whose .rodata holds `image` at a page boundary, as vdso_image_64's raw_data."""
    data = b"\0" * 0x3000 + image + b"\0" * 0x1000
    return [(1, 0x1000, 0xFFFFFFFF82000000, len(data) - 0x1000, len(data) - 0x1000)], data


@pytest.mark.parametrize("entsize", [12, 14])  # struct alt_instr before and since Linux 6.3
def test_the_running_vdso_is_accepted_as_the_kernel_patches_it(entsize: int) -> None:
    image = vdso_elf(entsize)
    (found,) = vdso_images(*kernel_with(image))
    assert found.vaddr == 0xFFFFFFFF82002000 and found.data == image
    assert [(s.offset - 0x100, s.length) for s in found.sites] == [(4, 5), (17, 5)]
    assert matches(found, image + bytes(100))  # as in the file
    patched = bytearray(image)
    patched[0x104:0x109] = LFENCE_RDTSC
    patched[0x111:0x116] = RDTSCP + b"\x66\x90"  # the other replacement, NOP-padded
    assert matches(found, bytes(patched))
    nops = bytearray(image)
    nops[0x104:0x109] = b"\x0f\x31" + b"\x0f\x1f\x00"  # the original with its padding turned into a long NOP
    assert matches(found, bytes(nops))
    assert VdsoImage.from_json(found.to_json()) == found


def test_anything_else_is_not_the_kernels_page() -> None:
    image = vdso_elf()
    (found,) = vdso_images(*kernel_with(image))
    jump = bytearray(image)
    jump[0x104:0x109] = b"\xe9\x00\x10\x00\x00"  # a jump to injected code, in an alternative site
    assert not matches(found, bytes(jump))
    tail = bytearray(image)
    tail[0x104:0x109] = LFENCE_RDTSC[:2] + b"\x90\x90\x90"  # a replacement cut short
    assert not matches(found, bytes(tail))
    outside = bytearray(image)
    outside[0x100] ^= 1  # one byte outside the sites
    assert not matches(found, bytes(outside))
    assert not matches(found, image[:-1])  # shorter than the image


def test_a_broken_embedded_image_is_a_format_error_not_a_crash() -> None:
    image = bytearray(vdso_elf())
    image[60:62] = struct.pack("<H", 9999)  # e_shnum
    with pytest.raises(FormatError, match="bad section table"):
        vdso_images(*kernel_with(bytes(image)))
    image = bytearray(vdso_elf())
    alt_at = 0x100 + len(TEXT) + len(LFENCE_RDTSC) + len(RDTSCP)  # the first alt_instr
    image[alt_at : alt_at + 4] = struct.pack("<i", 1 << 30)  # a site far outside the image
    with pytest.raises(FormatError, match="altinstructions"):
        vdso_images(*kernel_with(bytes(image)))
