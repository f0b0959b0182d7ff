"""Analyse a memory-only dump with drgn: processes and kernel modules, from outside the guest.

drgn does what is hard to get right: it reads the ELF (or kdump) core, and translates kernel virtual
addresses with the guest's page tables, KASLR included, from VMCOREINFO. drgn 0.3 has no BTF type finder,
so hostguard brings the rest itself:

* symbols (`init_task`, `modules`, `init_uts_ns`) from the kallsyms tables of the manifest-listed kernel
  FILE, plus the KASLR offset; only without that file, drgn's kallsyms loader over guest memory;
* struct layouts from the kernel file's BTF; only without it (and when allowed), from the BTF in guest
  memory (`__start_BTF`..`__stop_BTF`), with a logged warning.

The kernel file is used only if its GNU build id equals VMCOREINFO's `BUILD-ID`. As a last consistency check
`init_uts_ns` must hold the release VMCOREINFO names: a wrong offset or layout cannot go unnoticed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostguard.errors import FormatError, HostguardError
from hostguard.memory import kernel as kernelmod
from hostguard.memory.model import MemorySnapshot
from hostguard.memory.vmcoreinfo import SCAN_SOURCE, VmcoreInfo
from hostguard.memory.walk import MemoryFault, Walker, WalkLimits
from hostguard.record import Record, field

if TYPE_CHECKING:
    from hostguard.memory.guestram import GuestRam

log = logging.getLogger(__name__)

MAX_MEMORY_BTF = 64 << 20
MAX_MEMORY_SYMBOLS = 1 << 21


class MemoryCheckUnavailable(HostguardError):
    """The dump cannot be analysed for a reason that lies in the guest kernel or its configuration (no
    VMCOREINFO, kernel < 6.0 without kallsyms in it, no BTF). Policy decides whether that is a finding."""


class KernelMismatch(HostguardError):
    """The running kernel is not the manifest-listed kernel (different build id)."""

    def __init__(self, expected: str, found: str) -> None:
        self.expected = expected
        self.found = found
        super().__init__(f"the guest runs kernel build id {found}, the manifest lists {expected}")


class DrgnMemory:
    """`GuestMemory` over a drgn Program (kernel virtual addresses)."""

    def __init__(self, prog: Any) -> None:
        import drgn

        self.prog = prog
        self._errors = (drgn.FaultError, ValueError, OverflowError)

    def read(self, address: int, size: int) -> bytes:
        try:
            return bytes(self.prog.read(address, size))
        except self._errors as err:
            raise MemoryFault(str(err)) from None


class AnalysisOptions(Record):
    allow_memory_btf: bool = True  # fall back to the BTF in guest memory (logged) when the file has none
    allow_memory_symbols: bool = True  # fall back to kallsyms in guest memory when there is no kernel file
    limits: WalkLimits = field(default_factory=WalkLimits)


def open_program(dump: Path, info: VmcoreInfo) -> Any:
    import drgn

    prog = drgn.Program(vmcoreinfo=info.raw) if info.source == SCAN_SOURCE else drgn.Program()
    try:
        prog.set_core_dump(str(dump))
    except (drgn.FaultError, ValueError, OSError, drgn.MissingDebugInfoError) as err:
        raise MemoryCheckUnavailable(f"drgn cannot open the dump: {err}") from None
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        raise MemoryCheckUnavailable("the dump is not recognised as a Linux kernel dump")
    return prog


def open_live_program(ram: GuestRam, info: VmcoreInfo) -> Any:
    """A drgn Program over guest RAM read in place: drgn walks the guest's page tables (KASLR from
    VMCOREINFO) and reads guest-physical memory through `ram`."""
    import drgn

    platform = drgn.Platform(
        drgn.Architecture.X86_64, drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN
    )
    prog = drgn.Program(platform)

    def read(address: int, count: int, _offset: int, _physical: bool) -> bytes:
        try:
            return ram.read(address, count)
        except MemoryFault as err:
            raise drgn.FaultError(str(err), address) from None

    for r in ram.ranges:
        prog.add_memory_segment(r.gpa, r.size, read, True)
    try:
        prog.set_linux_kernel_custom(info.raw, True)
    except (ValueError, drgn.FaultError) as err:
        raise MemoryCheckUnavailable(f"drgn cannot use the guest's VMCOREINFO: {err}") from None
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        raise MemoryCheckUnavailable("guest memory is not recognised as a Linux kernel's")
    return prog


def check_kernel(info: VmcoreInfo, facts: kernelmod.KernelFacts | None) -> None:
    """VMCOREINFO must place the kernel and, with a kernel file, name that file's build id."""
    if info.kernel_offset is None:
        raise MemoryCheckUnavailable("VMCOREINFO has no KERNELOFFSET")
    if facts is not None:
        if info.build_id is None:
            raise MemoryCheckUnavailable("VMCOREINFO has no BUILD-ID: cannot tie guest memory to the kernel file")
        if facts.build_id != info.build_id:
            raise KernelMismatch(facts.build_id or "(none)", info.build_id)


def analyze_dump(
    dump: Path,
    info: VmcoreInfo,
    facts: kernelmod.KernelFacts | None,
    options: AnalysisOptions | None = None,
) -> MemorySnapshot:
    """Processes and modules of the kernel in `dump`. `facts` come from the manifest-listed kernel file
    (None: none listed). Raises `MemoryCheckUnavailable` or `KernelMismatch`."""
    check_kernel(info, facts)
    return analyze_program(open_program(dump, info), info, facts, options)


def analyze_program(
    prog: Any,
    info: VmcoreInfo,
    facts: kernelmod.KernelFacts | None,
    options: AnalysisOptions | None = None,
) -> MemorySnapshot:
    """`analyze_dump` on an open drgn Program (a dump, or guest RAM in place); `check_kernel` first."""
    opts = options or AnalysisOptions()
    warnings: list[str] = []
    assert info.kernel_offset is not None  # check_kernel
    mem = DrgnMemory(prog)

    # symbols
    symbols_source = "kernel-file"
    if facts is not None and facts.symbols:
        symbols = {name: (addr + info.kernel_offset) & 0xFFFFFFFFFFFFFFFF for name, addr in facts.symbols.items()}
    elif facts is not None and facts.symbols_problem and info.has_kallsyms:
        raise MemoryCheckUnavailable(f"kernel symbols: {facts.symbols_problem}")
    else:
        if not info.has_kallsyms:
            raise MemoryCheckUnavailable("VMCOREINFO does not locate the kallsyms tables (kernel older than 6.0)")
        if not opts.allow_memory_symbols:
            raise MemoryCheckUnavailable("no kernel file to take symbols from, and guest-memory symbols not allowed")
        symbols = _memory_symbols(prog, mem, info)
        symbols_source = "guest-memory"
        warnings.append("symbols taken from the kallsyms tables in guest memory (no manifest-listed kernel file)")

    # layout
    btf_source = "kernel-file"
    layout = facts.layout if facts is not None else None
    if layout is None:
        why = (facts.btf_problem if facts is not None else None) or "no manifest-listed kernel file"
        if not opts.allow_memory_btf:
            raise MemoryCheckUnavailable(f"no BTF: {why}")
        layout = _memory_layout(mem, symbols, why)
        btf_source = "guest-memory"
        message = f"BTF taken from guest memory: {why}"
        log.warning("%s", message)
        warnings.append(message)

    walker = Walker(mem, layout, opts.limits)
    for name in kernelmod.REQUIRED_SYMBOLS:
        if name not in symbols:
            raise MemoryCheckUnavailable(f"the kernel has no symbol {name}")
    try:
        release = walker.release(symbols["init_uts_ns"])
    except MemoryFault as err:
        raise MemoryCheckUnavailable(f"cannot read init_uts_ns: {err}") from None
    if release != info.osrelease:
        raise MemoryCheckUnavailable(
            f"memory does not fit VMCOREINFO: init_uts_ns says {release[:64]!r}, VMCOREINFO {info.osrelease[:64]!r}"
        )
    processes = walker.processes(symbols["init_task"])
    modules = walker.modules(symbols["modules"])
    return MemorySnapshot(
        kernel_release=info.osrelease,
        build_id=info.build_id,
        vmcoreinfo_source=info.source,
        btf_source=btf_source,
        symbols_source=symbols_source,
        processes=tuple(processes),
        modules=tuple(modules),
        anomalies=tuple(walker.anomalies),
        warnings=tuple(warnings),
    )


def _memory_symbols(prog: Any, mem: DrgnMemory, info: VmcoreInfo) -> dict[str, int]:
    """drgn's kallsyms loader over guest memory. It trusts the symbol count it reads: check it first."""
    import drgn
    from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms

    count_at = info.symbol("kallsyms_num_syms")
    try:
        count = int.from_bytes(mem.read(count_at, 4), "little") if count_at is not None else 0
    except MemoryFault as err:
        raise MemoryCheckUnavailable(f"cannot read the guest's kallsyms_num_syms: {err}") from None
    if not 0 < count <= MAX_MEMORY_SYMBOLS:
        raise MemoryCheckUnavailable(f"the guest's kallsyms table claims {count} symbols")
    try:
        index = load_vmlinux_kallsyms(prog)
    except (drgn.FaultError, ValueError, LookupError, drgn.ObjectAbsentError) as err:
        raise MemoryCheckUnavailable(f"cannot load kallsyms from guest memory: {err}") from None
    out = {}
    for name in kernelmod.SYMBOLS:
        found = index(prog, name, None, True)
        if found:
            out[name] = int(found[0].address)
    return out


def _memory_layout(mem: DrgnMemory, symbols: dict[str, int], why: str) -> dict[str, int]:
    start, stop = symbols.get("__start_BTF"), symbols.get("__stop_BTF")
    if start is None or stop is None:
        raise MemoryCheckUnavailable(f"no BTF: {why}, and the guest kernel has none in memory")
    if not 0 < stop - start <= MAX_MEMORY_BTF:
        raise MemoryCheckUnavailable(f"no BTF: {why}, and the guest's BTF size is implausible")
    try:
        data = mem.read(start, stop - start)
    except MemoryFault as err:
        raise MemoryCheckUnavailable(f"no BTF: {why}, and the guest's BTF is unreadable: {err}") from None
    try:
        return kernelmod.layout_from_btf(data)
    except FormatError as err:
        raise MemoryCheckUnavailable(f"no BTF: {why}, and the guest's BTF is unusable: {err.message}") from None
