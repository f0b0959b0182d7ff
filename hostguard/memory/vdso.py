"""The kernel's own ELF pages, derived from the signed kernel file: its vDSO images.

The kernel embeds each vDSO (64-bit, 32-bit compat, x32) as a complete ELF shared object, page-aligned, in its
read-only data. At boot it patches the image's alternative sites for the CPU it runs on (`.altinstructions`:
e.g. `rdtsc` becomes `lfence; rdtsc`), so the running copy differs from the file in those few bytes only.
`vdso_images(vmlinux)` finds the images in the kernel file; `matches(image, memory)` accepts the running copy
when every byte outside the alternative sites equals the file's, and each site holds the original instruction
or one of its replacements, padded with NOPs (what the kernel's apply_alternatives writes). Anything else is
not the kernel's own page. No reference boot and no admin step: the signed kernel file is the reference.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from typing import Any

from hostguard.errors import FormatError
from hostguard.record import Record

PAGE = 4096
MAX_IMAGE = 64 << 10
MAX_IMAGES = 8
MAX_SECTIONS = 128
MAX_SITES = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000
# x86 NOP encodings the kernel pads with (x86_nops, both the P6 and the 0x66-prefixed long forms)
NOPS = (
    bytes.fromhex("90"),
    bytes.fromhex("6690"),
    bytes.fromhex("0f1f00"),
    bytes.fromhex("0f1f4000"),
    bytes.fromhex("0f1f440000"),
    bytes.fromhex("660f1f440000"),
    bytes.fromhex("0f1f8000000000"),
    bytes.fromhex("0f1f840000000000"),
    bytes.fromhex("660f1f840000000000"),
    bytes.fromhex("2e660f1f840000000000"),
)
INT3 = 0xCC


class Site(Record):
    offset: int  # in the image
    length: int  # instrlen: the bytes the kernel may rewrite
    choices: tuple[bytes, ...]  # the original instruction(s) and each replacement, without padding


class VdsoImage(Record):
    vaddr: int  # link-time virtual address in the kernel
    data: bytes  # the image as the file holds it
    sites: tuple[Site, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "vaddr": self.vaddr,
            "data": base64.b64encode(self.data).decode(),
            "sites": [[s.offset, s.length, [c.hex() for c in s.choices]] for s in self.sites],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VdsoImage:
        sites = tuple(Site(int(o), int(n), tuple(bytes.fromhex(c) for c in cs)) for o, n, cs in doc["sites"])
        return cls(int(doc["vaddr"]), base64.b64decode(doc["data"], validate=True), sites)


def vdso_images(segments: Iterable[tuple[int, int, int, int, int]], data: Any) -> list[VdsoImage]:
    """The page-aligned ELF shared objects inside the kernel's load segments ((type, offset, vaddr, filesz,
    memsz) of a vmlinux, `data` its bytes)."""
    out: list[VdsoImage] = []
    for p_type, off, vaddr, filesz, _memsz in segments:
        if p_type != 1 or vaddr < START_KERNEL_MAP:
            continue
        start = off + (-vaddr % PAGE)
        for at in range(start, off + filesz - 64, PAGE):
            if data[at : at + 4] != b"\x7fELF" or data[at + 16] != 3:  # ET_DYN
                continue
            if len(out) >= MAX_IMAGES:
                raise FormatError("kernel: too many embedded ELF images")
            image = _image(bytes(data[at : min(at + MAX_IMAGE, off + filesz)]))
            out.append(VdsoImage(vaddr + at - off, image[0], image[1]))
    return out


def _image(blob: bytes) -> tuple[bytes, tuple[Site, ...]]:
    """(the image's own bytes, its alternative sites) of an embedded vDSO."""
    cls = blob[4]
    if cls not in (1, 2) or blob[5] != 1:
        raise FormatError("kernel: embedded ELF image is not little-endian ELF32/ELF64")
    if cls == 2:
        (shoff,) = struct.unpack_from("<Q", blob, 40)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 58)
        fmt, min_entsize = "<IIQQQQ", 64
    else:
        (shoff,) = struct.unpack_from("<I", blob, 32)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 46)
        fmt, min_entsize = "<IIIIII", 40
    end = shoff + shentsize * shnum
    if shentsize < min_entsize or not 0 < shnum <= MAX_SECTIONS or end > len(blob) or shstrndx >= shnum:
        raise FormatError("kernel: embedded ELF image has a bad section table")
    sections = [struct.unpack_from(fmt, blob, shoff + i * shentsize) for i in range(shnum)]
    _n, _t, _f, _a, str_off, str_size = sections[shstrndx]
    names = blob[str_off : str_off + str_size]
    named: dict[str, tuple[int, int, int]] = {}  # name -> (addr, offset, size)
    for name_off, sh_type, _flags, addr, offset, size in sections:
        if sh_type != 8:  # SHT_NOBITS has no bytes in the image
            end = max(end, offset + size)
        stop = names.find(b"\0", name_off)
        named[names[name_off:stop].decode("ascii", "replace")] = (addr, offset, size)
    if end > len(blob):
        raise FormatError("kernel: embedded ELF image runs past the kernel's data")
    image = blob[:end]
    return image, _sites(image, named)


def _sites(image: bytes, named: dict[str, tuple[int, int, int]]) -> tuple[Site, ...]:
    """The `.altinstructions` entries: struct alt_instr, 12 bytes before Linux 6.3 (u16 cpuid) and 14 after
    (u32 ft_flags); the size that makes every entry point into the image is the one in use."""
    alt = named.get(".altinstructions")
    if alt is None:
        return ()
    addr, offset, size = alt
    if offset + size > len(image):
        raise FormatError("kernel: vDSO .altinstructions outside the image")
    for entsize in (12, 14):
        if size % entsize or size // entsize > MAX_SITES:
            continue
        entries = []
        for i in range(size // entsize):
            at = offset + i * entsize
            instr_off, repl_off = struct.unpack_from("<ii", image, at)
            instrlen, repllen = image[at + entsize - 2], image[at + entsize - 1]
            instr = _to_offset(named, addr + i * entsize + instr_off)
            repl = _to_offset(named, addr + i * entsize + 4 + repl_off)
            if instr is None or repl is None or repllen > instrlen or instr + instrlen > len(image):
                break
            entries.append((instr, instrlen, image[repl : repl + repllen]))
        else:
            return _merge(image, entries)
    raise FormatError("kernel: vDSO .altinstructions cannot be read")


def _to_offset(named: dict[str, tuple[int, int, int]], vaddr: int) -> int | None:
    for addr, offset, size in named.values():
        if addr <= vaddr < addr + size:
            return offset + vaddr - addr
    return None


def _merge(image: bytes, entries: list[tuple[int, int, bytes]]) -> tuple[Site, ...]:
    """One site per patched place (ALTERNATIVE_2 gives two entries for one place)."""
    by_place: dict[int, tuple[int, set[bytes]]] = {}
    for instr, length, repl in entries:
        held = by_place.setdefault(instr, (length, {image[instr : instr + length].rstrip(b"\x90")}))
        if held[0] != length:
            raise FormatError("kernel: vDSO alternatives disagree on a site's length")
        held[1].add(repl)
    return tuple(Site(o, n, tuple(sorted(c))) for o, (n, c) in sorted(by_place.items()))


def _is_padding(pad: bytes) -> bool:
    """NOPs, or a short jump over the rest (newer kernels) followed by NOPs or int3."""
    if len(pad) >= 2 and pad[0] == 0xEB and pad[1] == len(pad) - 2:
        return all(b in (0x90, INT3) for b in pad[2:]) or _is_padding(pad[2:]) or len(pad) == 2
    while pad:
        for nop in sorted(NOPS, key=len, reverse=True):
            if pad.startswith(nop):
                pad = pad[len(nop) :]
                break
        else:
            return False
    return True


def site_ok(site: Site, found: bytes) -> bool:
    return any(found.startswith(c) and _is_padding(found[len(c) :]) for c in site.choices)


def matches(image: VdsoImage, memory: bytes) -> bool:
    """`memory` (the running copy, at least as long as the image) is `image` as the kernel patches it."""
    if len(memory) < len(image.data):
        return False
    pos = 0
    for site in image.sites:
        if memory[pos : site.offset] != image.data[pos : site.offset]:
            return False
        if not site_ok(site, memory[site.offset : site.offset + site.length]):
            return False
        pos = site.offset + site.length
    return memory[pos : len(image.data)] == image.data[pos:]
