"""What hostguard needs to know about a kernel, taken from the manifest-listed kernel FILE (trusted: its digest
is signed), cached per file digest.

* the vmlinux inside it (`hostguard.memory.vmlinux`), streamed into a private temporary file;
* its GNU build id (to match `BUILD-ID=` in the guest's VMCOREINFO), its load segments (the kernel image's
  extent, for the ELF scan) and the digest of its first page (the ELF header page the decompressor leaves).
* the vDSO images embedded in it (`hostguard.memory.vdso`): the kernel's own ELF pages in guest memory;
* struct layouts from its `.BTF` section (`LAYOUT_FIELDS`), and a few symbols decoded from its kallsyms
  tables (`hostguard.memory.kallsyms`), found where VMCOREINFO says they are. Symbols are link-time
  addresses; at run time add the KASLR offset (`KERNELOFFSET`). Nothing here comes from guest memory except
  the tables' locations, which are checked: the decoded `_stext` must be where VMCOREINFO says it is.

`load_facts()` returns `KernelFacts`; the JSON cache holds only these few numbers, so later checks of guests
with the same kernel skip decompression (~1 s) and BTF parsing (~0.5 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import mmap
import os
import zlib
from pathlib import Path
from typing import Any

from hostguard.errors import FormatError, HostguardError, ImageError
from hostguard.host.fsutil import atomic_write
from hostguard.memory.btf import Btf
from hostguard.memory.kallsyms import symbols_from_file
from hostguard.memory.vdso import VdsoImage, vdso_images
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.vmlinux import Vmlinux, extract_vmlinux
from hostguard.record import Record, as_dict, field

log = logging.getLogger(__name__)

CACHE_SCHEMA = 6
MAX_KERNEL_FILE = 256 << 20
PAGE = 4096

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
    "__start_rodata",
    "__end_rodata",
    "vmemmap_base",  # where the page array starts under memory-region KASLR (kernelranges.page_array_ranges)
    "io_tlb_default_mem",  # the swiotlb bounce buffer: the ELF scan need not read it (kernelranges.bounce_buffer_range)
)
REQUIRED_SYMBOLS = ("init_task", "modules", "init_uts_ns")


class KernelFacts(Record):
    sha256: str
    build_id: str | None
    image_start: int  # link-time virtual address of the first loaded byte (_text)
    image_end: int  # ... and one past the last
    head_page_sha256: str  # the vmlinux ELF header page, zero-padded to a page
    layout: dict[str, int] | None = field(default=None, hash=False)  # None: the file has no usable BTF
    btf_problem: str | None = None
    symbols: dict[str, int] = field(default_factory=dict, hash=False)  # link-time addresses
    symbols_problem: str | None = None
    vdso: list[dict[str, Any]] = field(default_factory=list, hash=False)  # vdso.VdsoImage.to_json()
    vdso_problem: str | None = None

    def vdso_images(self) -> list[VdsoImage]:
        return [VdsoImage.from_json(d) for d in self.vdso]

    def to_json(self) -> dict[str, Any]:
        return {"schema": CACHE_SCHEMA, **as_dict(self)}


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


def image_range(facts: KernelFacts) -> tuple[int, int]:
    """Link-time [start, end) of the kernel's read-only data, where the vDSO images live. Not the whole image:
    the kernel frees its init memory and the gaps between text, rodata and data after boot, and those pages
    are reused for anything (page cache included), which must not count as the kernel's own."""
    start = facts.symbols.get("__start_rodata") or facts.symbols.get("_text", facts.image_start)
    end = facts.symbols.get("__end_rodata") or facts.symbols.get("_end", facts.image_end)
    return start, end


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
    # In memory (memfd), not in a file: the check writes nothing to disk but the few numbers it caches.
    with os.fdopen(os.memfd_create("hostguard-vmlinux", os.MFD_CLOEXEC), "w+b") as tmp:
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
            symbols = symbols_from_file(vmlinux, info, SYMBOLS, REQUIRED_SYMBOLS)
        except FormatError as err:
            symbols_problem = err.message
    vdso: list[dict[str, Any]] = []
    vdso_problem = None
    try:
        vdso = [image.to_json() for image in vdso_images(vmlinux.segments, vmlinux.data)]
    except FormatError as err:
        vdso_problem = err.message
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
        vdso=vdso,
        vdso_problem=vdso_problem,
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
    data = json.dumps(facts.to_json(), sort_keys=True).encode()
    atomic_write(path, data, mode=0o600, durable=False, error=HostguardError)  # a cache: rebuilt if lost
