"""What hostguard needs to know about a kernel, taken from the manifest-listed kernel FILE (trusted: its digest
is signed), cached per file digest.

* `vmlinux` from a bzImage: the compressed payload (gzip, xz, lzma, bzip2 or zstd) named by the setup header
  (`payload_offset`/`payload_length`, boot protocol >= 2.08) is streamed into a private temporary file.
* its GNU build id (to match `BUILD-ID=` in the guest's VMCOREINFO), its load segments (the kernel image's
  extent, for the ELF scan) and the digest of its first page (the ELF header page the decompressor leaves).
* struct layouts from its `.BTF` section (`LAYOUT_FIELDS`), and a few symbols decoded from its kallsyms
  tables, found where VMCOREINFO says they are. Symbols are link-time addresses; at run time add the KASLR
  offset (`KERNELOFFSET`). Nothing here comes from guest memory except the tables' locations, which are
  checked: the decoded `_stext` must be where VMCOREINFO says it is.

`load_facts()` returns `KernelFacts`; the JSON cache holds only these few numbers, so later checks of guests
with the same kernel skip decompression (~1 s) and BTF parsing (~0.5 s).
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import logging
import lzma
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from hostguard.errors import FormatError, HostguardError, ImageError
from hostguard.memory.btf import Btf
from hostguard.memory.vmcoreinfo import VmcoreInfo

log = logging.getLogger(__name__)

CACHE_SCHEMA = 2
MAX_KERNEL_FILE = 256 << 20
MAX_VMLINUX = 1 << 30
MAX_SECTIONS = 65535
PAGE = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000

# (struct, member path) pairs the analysis reads; "sizeof:<struct>" for sizes.
LAYOUT_FIELDS: tuple[tuple[str, str], ...] = (
    ("task_struct", "tasks"),
    ("task_struct", "pid"),
    ("task_struct", "tgid"),
    ("task_struct", "comm"),
    ("task_struct", "mm"),
    ("task_struct", "flags"),
    ("task_struct", "real_parent"),
    ("task_struct", "exit_state"),
    ("mm_struct", "exe_file"),
    ("file", "f_path"),
    ("path", "mnt"),
    ("path", "dentry"),
    ("dentry", "d_parent"),
    ("dentry", "d_name"),
    ("dentry", "d_inode"),
    ("dentry", "d_hash"),
    ("dentry", "d_sb"),
    ("qstr", "len"),
    ("qstr", "name"),
    ("hlist_bl_node", "pprev"),
    ("inode", "i_ino"),
    ("inode", "i_sb"),
    ("inode", "__i_nlink"),
    ("inode", "i_mode"),
    ("super_block", "s_dev"),
    ("super_block", "s_id"),
    ("super_block", "s_uuid"),
    ("super_block", "s_type"),
    ("file_system_type", "name"),
    ("mount", "mnt"),
    ("mount", "mnt_parent"),
    ("mount", "mnt_mountpoint"),
    ("mount", "mnt_id"),
    ("vfsmount", "mnt_root"),
    ("vfsmount", "mnt_sb"),
    ("module", "list"),
    ("module", "name"),
    ("module", "state"),
    ("list_head", "next"),
    ("list_head", "prev"),
    ("uts_namespace", "name"),
    ("new_utsname", "release"),
)
SYMBOLS = (
    "init_task",
    "modules",
    "init_uts_ns",
    "__start_BTF",
    "__stop_BTF",
    "_stext",
    "_text",
    "_end",
    "__end_rodata",
)
REQUIRED_SYMBOLS = ("init_task", "modules", "init_uts_ns")


@dataclass(frozen=True)
class KernelFacts:
    sha256: str
    build_id: str | None
    image_start: int  # link-time virtual address of the first loaded byte (_text)
    image_end: int  # ... and one past the last
    head_page_sha256: str  # the vmlinux ELF header page, zero-padded to a page
    layout: dict[str, int] | None = field(default=None, hash=False)  # None: the file has no usable BTF
    btf_problem: str | None = None
    symbols: dict[str, int] = field(default_factory=dict, hash=False)  # link-time addresses
    symbols_problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"schema": CACHE_SCHEMA, **asdict(self)}


# --- layouts ------------------------------------------------------------------------------------------------


def layout_from_btf(data: bytes) -> dict[str, int]:
    """Offsets ("struct.member" -> byte offset) and sizes ("sizeof:struct", "len:struct.member") the
    analysis needs. `FormatError` if the BTF is malformed or lacks one of them."""
    btf = Btf(data)
    out: dict[str, int] = {}
    for struct_name, member in LAYOUT_FIELDS:
        m = btf.member(struct_name, member)
        out[f"{struct_name}.{member}"] = m.offset
        out[f"len:{struct_name}.{member}"] = m.size
    for struct_name in ("task_struct", "module", "mount", "dentry", "inode"):
        out[f"sizeof:{struct_name}"] = btf.sizeof(struct_name)
    return out


# --- decompression ------------------------------------------------------------------------------------------


def _payload(head: bytes) -> tuple[int, int] | None:
    """(offset, length) of a bzImage's compressed vmlinux, or None if `head` is not a bzImage."""
    if len(head) < 0x250 or head[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", head, 0x206)[0]
    if version < 0x208:
        raise FormatError("kernel: bzImage boot protocol older than 2.08 has no payload fields")
    setup_sects = head[0x1F1] or 4
    offset, length = struct.unpack_from("<II", head, 0x248)
    return (setup_sects + 1) * 512 + offset, length


def _decompressor(magic: bytes) -> tuple[str, Callable[[], Any] | None]:
    if magic.startswith(b"\x1f\x8b"):
        return "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    if magic.startswith(b"\x5d\x00\x00"):
        return "lzma", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    if magic.startswith(b"BZh"):
        return "bzip2", bz2.BZ2Decompressor
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd", None  # through the zstd tool
    if magic.startswith(b"\x02\x21\x4c\x18"):
        return "lz4", None
    return "unknown", None


def extract_vmlinux(kernel: Path, out: BinaryIO) -> None:
    """Write the vmlinux ELF inside `kernel` (a bzImage, or already an ELF file) to `out`."""
    with kernel.open("rb") as f:
        head = f.read(0x1000)
        if head.startswith(b"\x7fELF"):
            f.seek(0)
            shutil.copyfileobj(f, out)
            return
        where = _payload(head)
        if where is None:
            raise FormatError(f"kernel {kernel.name}: neither a bzImage nor an ELF vmlinux")
        offset, length = where
        size = os.fstat(f.fileno()).st_size
        if offset + length > size:
            raise FormatError(f"kernel {kernel.name}: payload lies outside the file")
        f.seek(offset)
        magic = f.read(8)
        f.seek(offset)
        name, make = _decompressor(magic)
        if name == "zstd":
            _zstd_tool(f, length, out, kernel)
            return
        if make is None:
            raise FormatError(f"kernel {kernel.name}: {name} compressed payload is not supported")
        _stream(make(), name, f, length, out, what=kernel.name)


def _stream(dec: Any, name: str, f: BinaryIO, length: int, out: BinaryIO, *, what: str) -> None:
    """Decompress `length` bytes of `f` into `out`, never holding more than a few MiB, output bounded."""
    written = 0
    remaining = length
    pending = b""
    while not dec.eof:
        if name == "gzip":
            if not pending:
                pending = f.read(min(remaining, 1 << 20))
                remaining -= len(pending)
                if not pending:
                    break
            part = dec.decompress(pending, 16 << 20)
            pending = dec.unconsumed_tail
        else:
            chunk = b""
            if dec.needs_input:
                chunk = f.read(min(remaining, 1 << 20))
                remaining -= len(chunk)
                if not chunk:
                    break
            part = dec.decompress(chunk, 16 << 20)
        written += len(part)
        if written > MAX_VMLINUX:
            raise FormatError(f"kernel {what}: vmlinux larger than {MAX_VMLINUX} bytes")
        out.write(part)
    if not dec.eof:
        raise FormatError(f"kernel {what}: {name} payload is truncated")


def _zstd_tool(f: BinaryIO, length: int, out: BinaryIO, kernel: Path) -> None:
    tool = shutil.which("zstd")
    if tool is None:
        raise FormatError(f"kernel {kernel.name}: zstd compressed payload needs the zstd tool")
    with tempfile.TemporaryFile() as src:
        remaining = length
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            src.write(chunk)
            remaining -= len(chunk)
        src.seek(0)
        out.flush()
        proc = subprocess.run(
            [tool, "-dcq", "--no-progress"], stdin=src, stdout=out, stderr=subprocess.PIPE, check=False, timeout=120
        )
    if proc.returncode != 0 and not proc.stderr.startswith(b"zstd: /*stdin*\\: unknown header"):
        raise FormatError(f"kernel {kernel.name}: zstd failed: {proc.stderr.decode(errors='replace')[:200]}")


# --- the vmlinux ELF ----------------------------------------------------------------------------------------


class Vmlinux:
    """Read-only view of a vmlinux ELF64 little-endian file (bounded)."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise FormatError("vmlinux: not an ELF64 little-endian file")
        (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 32)
        e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHHHH", data, 54)
        self.segments: list[tuple[int, int, int, int, int]] = []  # (type, offset, vaddr, filesz, memsz)
        if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
            raise FormatError("vmlinux: bad program header table")
        for i in range(e_phnum):
            entry = struct.unpack_from("<IIQQQQQ", data, e_phoff + i * e_phentsize)
            p_type, _fl, off, vaddr, _pa, filesz, memsz = entry
            self.segments.append((p_type, off, vaddr, filesz, memsz))
        self.sections: dict[str, tuple[int, int, int, int]] = {}  # name -> (type, addr, offset, size)
        if e_shnum == 0:
            return
        if e_shentsize < 64 or e_shnum > MAX_SECTIONS or e_shoff + e_shnum * e_shentsize > len(data):
            raise FormatError("vmlinux: bad section header table")
        raw = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
        if e_shstrndx >= e_shnum:
            raise FormatError("vmlinux: bad section name table index")
        _n, _t, _f, _a, str_off, str_size = raw[e_shstrndx]
        if str_off + str_size > len(data):
            raise FormatError("vmlinux: section names outside the file")
        names = bytes(data[str_off : str_off + str_size])
        for name_off, sh_type, _flags, addr, off, size in raw:
            end = names.find(b"\0", name_off)
            name = names[name_off:end].decode("ascii", "replace") if 0 <= name_off < len(names) and end >= 0 else ""
            if sh_type != 8 and off + size > len(data):  # SHT_NOBITS has no file content
                raise FormatError(f"vmlinux: section {name} outside the file")
            self.sections.setdefault(name, (sh_type, addr, off, size))

    def section(self, name: str) -> bytes | None:
        s = self.sections.get(name)
        if s is None or s[0] == 8:
            return None
        return bytes(self.data[s[2] : s[2] + s[3]])

    def build_id(self) -> str | None:
        for p_type, off, _va, filesz, _m in self.segments:
            if p_type != 4 or filesz > 1 << 20 or off + filesz > len(self.data):
                continue
            pos, end = off, off + filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                desc = pos + 12 + ((namesz + 3) & ~3)
                if desc + descsz > end:
                    break
                if ntype == 3 and bytes(self.data[pos + 12 : pos + 12 + namesz]).rstrip(b"\0") == b"GNU":
                    return bytes(self.data[desc : desc + descsz]).hex()
                pos = desc + ((descsz + 3) & ~3)
        return None

    def image_extent(self) -> tuple[int, int]:
        """(first, end) link-time virtual addresses of the kernel-space load segments."""
        loads = [(va, va + memsz) for t, _o, va, _f, memsz in self.segments if t == 1 and va >= START_KERNEL_MAP]
        if not loads:
            raise FormatError("vmlinux: no kernel-space load segment")
        return min(a for a, _ in loads), max(b for _, b in loads)

    def read_virtual(self, address: int, size: int) -> bytes:
        for t, off, va, filesz, _m in self.segments:
            if t == 1 and va >= START_KERNEL_MAP and va <= address and address + size <= va + filesz:
                start = off + address - va
                return bytes(self.data[start : start + size])
        raise FormatError(f"vmlinux: address {address:#x} (+{size}) is not in the file")


# --- kallsyms -----------------------------------------------------------------------------------------------


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


def image_range(facts: KernelFacts) -> tuple[int, int]:
    """Link-time [start, end) of the kernel's text and read-only data: what stays in place after boot
    (init memory beyond it is freed and reused for anything, page cache included)."""
    start = facts.symbols.get("_text", facts.image_start)
    end = facts.symbols.get("__end_rodata") or facts.symbols.get("_end", facts.image_end)
    return start, end


def kallsyms_tables(info: VmcoreInfo) -> dict[str, int]:
    """Link-time addresses of the kallsyms tables VMCOREINFO names (runtime address minus KERNELOFFSET)."""
    offset = info.kernel_offset or 0
    out = {}
    for name in _TABLES:
        value = info.symbol(name)
        if value is not None:
            out[name] = (value - offset) & 0xFFFFFFFFFFFFFFFF
    return out


def symbols_from_file(vmlinux: Vmlinux, info: VmcoreInfo) -> dict[str, int]:
    if not info.has_kallsyms:
        raise FormatError("VMCOREINFO has no kallsyms tables (Linux < 6.0)")
    tables = kallsyms_tables(info)
    symbols = decode_kallsyms(vmlinux.read_virtual, tables, SYMBOLS)
    stext = info.symbol("_stext")
    if stext is None or symbols.get("_stext") != (stext - (info.kernel_offset or 0)) & 0xFFFFFFFFFFFFFFFF:
        raise FormatError("kallsyms decoded from the kernel file disagree with VMCOREINFO (_stext)")
    missing = [s for s in REQUIRED_SYMBOLS if s not in symbols]
    if missing:
        raise FormatError(f"kallsyms: the kernel has no symbol {missing[0]}")
    return symbols


# --- the cache ----------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_KERNEL_FILE:
            raise ImageError(f"kernel {path}: {size} bytes is larger than {MAX_KERNEL_FILE}")
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_facts(kernel: Path, info: VmcoreInfo | None, cache_dir: Path, *, sha256: str | None = None) -> KernelFacts:
    """Facts about `kernel` (see the module docstring), from `cache_dir` when known. `info` is needed
    only to locate the kallsyms tables the first time (facts without symbols are not cached)."""
    digest = sha256 or file_sha256(kernel)
    cache = _private_dir(cache_dir) / f"{digest}.json"
    cached = _read_cache(cache, digest)
    if cached is not None and (cached.symbols or info is None or cached.symbols_problem):
        return cached
    with tempfile.TemporaryFile(dir=cache_dir) as tmp:
        try:
            extract_vmlinux(kernel, tmp)
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as err:
            raise FormatError(f"kernel {kernel.name}: cannot decompress ({type(err).__name__}: {err})") from None
        tmp.flush()
        if os.fstat(tmp.fileno()).st_size < 64:
            raise FormatError(f"kernel {kernel.name}: decompressed to nothing")
        with mmap.mmap(tmp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            facts = _facts(Vmlinux(data), digest, info)
    _write_cache(cache, facts)
    return facts


def _facts(vmlinux: Vmlinux, digest: str, info: VmcoreInfo | None) -> KernelFacts:
    start, end = vmlinux.image_extent()
    head = bytes(vmlinux.data[:PAGE]).ljust(PAGE, b"\0")
    layout = None
    btf_problem = None
    btf = vmlinux.section(".BTF")
    if btf is None:
        btf_problem = "the kernel file has no .BTF section (CONFIG_DEBUG_INFO_BTF is off)"
    else:
        try:
            layout = layout_from_btf(btf)
        except FormatError as err:
            btf_problem = f"the kernel file's BTF is unusable: {err.message}"
    symbols: dict[str, int] = {}
    symbols_problem = None
    if info is not None:
        try:
            symbols = symbols_from_file(vmlinux, info)
        except FormatError as err:
            symbols_problem = err.message
    return KernelFacts(
        sha256=digest,
        build_id=vmlinux.build_id(),
        image_start=start,
        image_end=end,
        head_page_sha256=hashlib.sha256(head).hexdigest(),
        layout=layout,
        btf_problem=btf_problem,
        symbols=symbols,
        symbols_problem=symbols_problem,
    )


def _read_cache(path: Path, digest: str) -> KernelFacts | None:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable kernel facts cache %s: %s", path, err)
        return None
    try:
        if doc.pop("schema") != CACHE_SCHEMA or doc.get("sha256") != digest:
            return None
        return KernelFacts(**doc)
    except (KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring malformed kernel facts cache %s: %s", path, err)
        return None


def _write_cache(path: Path, facts: KernelFacts) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(facts.to_json(), f, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HostguardError(f"cannot write kernel facts cache {path}: {err}") from None


def extract_btf(kernel: Path) -> bytes | None:
    """The `.BTF` section of a kernel file (for tools and tests); None if it has none."""
    with tempfile.TemporaryFile() as tmp:
        extract_vmlinux(kernel, tmp)
        tmp.flush()
        with mmap.mmap(tmp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return Vmlinux(data).section(".BTF")
