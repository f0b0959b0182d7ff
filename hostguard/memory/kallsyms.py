"""Kernel symbols from the kallsyms tables (kernel/kallsyms.c, Linux 6.x), decoded in Python.

Linux >= 6.0 names its kallsyms tables in VMCOREINFO. hostguard reads those tables from the manifest-listed
kernel FILE rather than from guest memory (the file is signed; memory is not): VMCOREINFO's table addresses,
minus the KASLR offset, are link-time addresses inside the file. The decoded `_stext` must match VMCOREINFO,
so a wrong offset or a doctored table location cannot go unnoticed. Decoding stops once every wanted name
is found; counts and lengths are bounded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping

from hostguard.errors import FormatError
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.vmlinux import Vmlinux


def decode_kallsyms(
    read: Callable[[int, int], bytes], addrs: Mapping[str, int], wanted: Iterable[str], *, max_symbols: int = 1 << 21
) -> dict[str, int]:
    """Decode the kernel's compressed symbol table (kernel/kallsyms.c, 6.x) through `read(address, size)`,
    stopping once every name in `wanted` is found. `addrs` are the table addresses (`kallsyms_names`, ...,
    in the same address space `read` uses). Returns name -> address as stored (link-time in the file)."""
    wanted = set(wanted)
    num = struct.unpack("<I", read(addrs["kallsyms_num_syms"], 4))[0]
    if not 0 < num <= max_symbols:
        raise FormatError(f"kallsyms: implausible symbol count {num}")
    index = struct.unpack("<256H", read(addrs["kallsyms_token_index"], 512))
    table_len = max(index) + 256
    table = read(addrs["kallsyms_token_table"], table_len)
    tokens = []
    for start in index:
        end = table.find(b"\0", start)
        if end < 0:
            raise FormatError("kallsyms: unterminated token")
        tokens.append(table[start:end])
    relative = "kallsyms_offsets" in addrs
    base = struct.unpack("<Q", read(addrs["kallsyms_relative_base"], 8))[0] if relative else 0
    pos = addrs["kallsyms_names"]
    buf = b""
    buf_start = pos
    found: dict[int, str] = {}

    def names(n: int) -> bytes:
        nonlocal buf, buf_start, pos
        off = pos - buf_start
        if off + n > len(buf):
            buf_start, off = pos, 0
            try:
                buf = read(pos, max(n, 1 << 16))
            except FormatError:  # near the end of the segment
                buf = read(pos, n)
        pos += n
        return buf[off : off + n]

    for i in range(num):
        length = names(1)[0]
        if length & 0x80:  # "big" symbol names (Linux 6.1+): 2-byte ULEB128 length
            length = (length & 0x7F) | (names(1)[0] << 7)
        name = b"".join(tokens[b] for b in names(length))[1:]  # the first char is the symbol type
        text = name.decode("ascii", "replace")
        if text in wanted:
            found[i] = text
            wanted.discard(text)
            if not wanted:
                break
    out: dict[str, int] = {}
    for i, text in found.items():
        if relative:
            value = struct.unpack("<i", read(addrs["kallsyms_offsets"] + 4 * i, 4))[0]
            # CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 before 6.11): negative offsets are relative
            out[text] = base - 1 - value if value < 0 else value
        else:
            out[text] = struct.unpack("<Q", read(addrs["kallsyms_addresses"] + 8 * i, 8))[0]
    return out


_TABLES = (
    "kallsyms_names",
    "kallsyms_num_syms",
    "kallsyms_token_table",
    "kallsyms_token_index",
    "kallsyms_offsets",
    "kallsyms_relative_base",
    "kallsyms_addresses",
)


def kallsyms_tables(info: VmcoreInfo) -> dict[str, int]:
    """Link-time addresses of the kallsyms tables VMCOREINFO names (runtime address minus KERNELOFFSET)."""
    offset = info.kernel_offset or 0
    out = {}
    for name in _TABLES:
        value = info.symbol(name)
        if value is not None:
            out[name] = (value - offset) & 0xFFFFFFFFFFFFFFFF
    return out


def symbols_from_file(
    vmlinux: Vmlinux, info: VmcoreInfo, wanted: Iterable[str], required: Iterable[str]
) -> dict[str, int]:
    """`wanted` symbols (link-time addresses) from the kallsyms tables of the kernel FILE, located with
    VMCOREINFO; `FormatError` unless `_stext` decodes to where VMCOREINFO puts it and `required` are found."""
    if not info.has_kallsyms:
        raise FormatError("VMCOREINFO has no kallsyms tables (Linux < 6.0)")
    tables = kallsyms_tables(info)
    symbols = decode_kallsyms(vmlinux.read_virtual, tables, {*wanted, "_stext"})
    stext = info.symbol("_stext")
    if stext is None or symbols.get("_stext") != (stext - (info.kernel_offset or 0)) & 0xFFFFFFFFFFFFFFFF:
        raise FormatError("kallsyms decoded from the kernel file disagree with VMCOREINFO (_stext)")
    missing = [s for s in required if s not in symbols]
    if missing:
        raise FormatError(f"kallsyms: the kernel has no symbol {missing[0]}")
    return symbols
