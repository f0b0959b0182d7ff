"""VMCOREINFO: the kernel's own description of itself (release, build id, KASLR offset, symbol locations).

Two sources, both guest-controlled and therefore parsed with bounds:

* the `VMCOREINFO` ELF note of a QEMU memory dump, present when the domain has `<vmcoreinfo state='on'/>`
  and the guest loaded `qemu_fw_cfg` (the kernel then tells QEMU where its note lives);
* otherwise the text the kernel keeps in its own memory (`vmcoreinfo_data`, filled at boot): found by
  scanning the dump for `OSRELEASE=`. Several copies exist (the data page and the note page); copies that
  disagree are only accepted when exactly one of them carries the expected build id.

The build id is what ties a dump to a kernel file: hostguard takes symbols and struct layouts from the
manifest-listed kernel only when `BUILD-ID=` matches that file's GNU build id.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from hostguard.errors import FormatError
from hostguard.record import Record, field

MAX_VMCOREINFO_BYTES = 8192  # the kernel's buffer is one page (VMCOREINFO_BYTES)
MAX_SCAN_CANDIDATES = 64
MAX_NOTES_BYTES = 1 << 20
_LINE = re.compile(rb"[A-Za-z0-9_()./-]{1,128}=[ -~]{0,256}")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_BUILD_ID = re.compile(r"[0-9a-f]{2,128}")

NOTE_SOURCE = "elf-note"
SCAN_SOURCE = "memory-scan"


class VmcoreInfo(Record):
    raw: bytes  # the text as found (without trailing NULs): what drgn is given
    fields: dict[str, str] = field(hash=False)
    source: str  # NOTE_SOURCE or SCAN_SOURCE

    @property
    def osrelease(self) -> str:
        return self.fields.get("OSRELEASE", "")

    @property
    def build_id(self) -> str | None:
        value = self.fields.get("BUILD-ID")
        return value.lower() if value and _BUILD_ID.fullmatch(value.lower()) else None

    @property
    def kernel_offset(self) -> int | None:
        value = self.fields.get("KERNELOFFSET")
        return int(value, 16) if value is not None and _HEX.fullmatch(value) else None

    @property
    def phys_base(self) -> int | None:
        value = self.fields.get("NUMBER(phys_base)")
        try:
            return int(value) if value is not None and len(value) <= 24 else None
        except ValueError:
            return None

    @property
    def page_size(self) -> int:
        value = self.fields.get("PAGESIZE", "4096")
        return int(value) if value.isdigit() and value in ("4096", "16384", "65536") else 4096

    def symbol(self, name: str) -> int | None:
        value = self.fields.get(f"SYMBOL({name})")
        return int(value, 16) if value is not None and _HEX.fullmatch(value) else None

    @property
    def has_kallsyms(self) -> bool:
        """Linux >= 6.0 publishes the kallsyms tables in VMCOREINFO (commit f09bddbd8661)."""
        return all(
            self.symbol(n) is not None
            for n in ("kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table", "kallsyms_token_index", "_stext")
        ) and (self.symbol("kallsyms_offsets") is not None or self.symbol("kallsyms_addresses") is not None)


def parse(raw: bytes, source: str) -> VmcoreInfo:
    """Parse VMCOREINFO text. Lines must be KEY=VALUE in printable ASCII; the first must be OSRELEASE."""
    raw = raw.split(b"\0", 1)[0]
    if len(raw) > MAX_VMCOREINFO_BYTES:
        raise FormatError(f"VMCOREINFO: {len(raw)} bytes exceed {MAX_VMCOREINFO_BYTES}")
    if not raw.startswith(b"OSRELEASE="):
        raise FormatError("VMCOREINFO does not start with OSRELEASE=")
    fields: dict[str, str] = {}
    for line in raw.split(b"\n"):
        if not line:
            continue
        if not _LINE.fullmatch(line):
            raise FormatError("VMCOREINFO has a malformed line")
        key, _, value = line.decode("ascii").partition("=")
        fields.setdefault(key, value)  # the first occurrence wins, as in makedumpfile
    return VmcoreInfo(raw, fields, source)


# --- from the dump ------------------------------------------------------------------------------------------


def _elf_notes(fh: mmap.mmap) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every note in an ELF64 little-endian core's PT_NOTE segments."""
    if fh[:4] != b"\x7fELF" or fh[4] != 2 or fh[5] != 1:
        return
    (e_phoff,) = struct.unpack_from("<Q", fh, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", fh, 54)
    if e_phentsize < 56 or e_phnum > 4096 or e_phoff + e_phnum * e_phentsize > len(fh):
        raise FormatError("memory dump: bad ELF program header table")
    for i in range(e_phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", fh, e_phoff + i * e_phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        if p_filesz > MAX_NOTES_BYTES or p_offset + p_filesz > len(fh):
            raise FormatError("memory dump: note segment out of bounds")
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", fh, pos)
            name_end = pos + 12 + namesz
            desc_start = pos + 12 + ((namesz + 3) & ~3)
            desc_end = desc_start + descsz
            if desc_end > end:
                break
            yield bytes(fh[pos + 12 : name_end]).rstrip(b"\0"), ntype, bytes(fh[desc_start:desc_end])
            pos = desc_start + ((descsz + 3) & ~3)


def from_dump(path: Path, *, expected_build_id: str | None = None) -> VmcoreInfo | None:
    """VMCOREINFO of an ELF memory dump: the note if there is one, else the kernel's in-memory copy.
    None when neither exists. `FormatError` when the copies found contradict each other."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as fh:
        for name, _type, desc in _elf_notes(fh):
            if name == b"VMCOREINFO":
                try:
                    return parse(desc, NOTE_SOURCE)
                except FormatError:
                    break  # a damaged note: fall back to the in-memory copies
        return _scan(fh, expected_build_id)


def _scan(fh: mmap.mmap, expected_build_id: str | None) -> VmcoreInfo | None:
    found = Candidates(expected_build_id)
    found.search(0, fh)
    return found.choice()[0] if found else None


class Candidates:
    """VMCOREINFO copies found by scanning memory (a dump file, or guest RAM chunk by chunk), bounded."""

    def __init__(self, expected_build_id: str | None) -> None:
        self.expected_build_id = expected_build_id
        self.found: dict[bytes, tuple[VmcoreInfo, list[int]]] = {}
        self.scanned = 0

    def __bool__(self) -> bool:
        return bool(self.found)

    def search(self, base: int, data: bytes | mmap.mmap, end: int | None = None) -> None:
        """Look for copies that start in `data[:end]` (`data` extends past `end` so a copy that straddles
        the end is read whole); `base` is the address of `data[0]`."""
        limit = len(data) if end is None else end
        pos = 0
        while True:
            pos = data.find(b"OSRELEASE=", pos, limit + 9)
            if pos < 0 or pos >= limit:
                return
            self.consider(base + pos, data[pos : pos + MAX_VMCOREINFO_BYTES + 1])
            pos += 10

    def consider(self, at: int, text: bytes | mmap.mmap) -> None:
        """One place that says OSRELEASE= (`text` starts there, up to MAX_VMCOREINFO_BYTES + 1 bytes)."""
        if self.scanned >= MAX_SCAN_CANDIDATES * 16:
            return
        self.scanned += 1
        try:
            info = parse(bytes(text).split(b"\0", 1)[0], SCAN_SOURCE)
        except FormatError:
            return
        if info.build_id is None or info.kernel_offset is None:
            return  # a fragment, or some other text that happens to say OSRELEASE=
        self.found.setdefault(info.raw, (info, []))[1].append(at)
        if len(self.found) > MAX_SCAN_CANDIDATES:
            raise FormatError("memory: too many different VMCOREINFO copies")

    def choice(self) -> tuple[VmcoreInfo, list[int]]:
        """The kernel's VMCOREINFO and the addresses of its copies. The kernel's copies (its data page, the
        note it prepared for a crash) agree on every line; only CRASHTIME is added at crash time. A guest
        process can plant text that looks like VMCOREINFO: any difference makes the source ambiguous, unless
        the expected build id singles out one consistent set."""
        candidates = list(self.found.values())
        keys = {_key(i) for i, _ in candidates}
        if len(keys) > 1 and self.expected_build_id is not None:
            candidates = [c for c in candidates if c[0].build_id == self.expected_build_id]
            keys = {_key(i) for i, _ in candidates}
        if len(keys) != 1:
            raise FormatError("memory: VMCOREINFO copies disagree (release, build id or KASLR offset)")
        best = max(candidates, key=lambda c: len(c[0].raw))
        return best[0], sorted(a for _, addrs in candidates for a in addrs)


def _key(info: VmcoreInfo) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in info.fields.items() if k != "CRASHTIME"))
