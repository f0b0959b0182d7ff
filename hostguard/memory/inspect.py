"""The entry points the CLI (`hostguard memory inspect DOMAIN`) and the daemon call.

`inspect_domain_memory(name, manifest, kernel_path, workdir)` reads the running domain's RAM in place
(`live`: nothing written anywhere; a whole-RAM dump only as a fallback, noted), analyses it (processes,
modules: `analyze`), scans it for ELF pages (`elfscan`), judges the kernel's own pages against the signed
kernel file's vDSO images (`vdso`) and compares everything with the manifest (`judge`). `inspect_dump` does
the same on an existing dump. `record_vdso_baseline` stores the kernel-image ELF pages of a trusted reference
boot (no longer needed: the kernel file is the reference; a stored baseline is still honoured).

Work directory layout (all root-only): `dumps/` (transient, dump path only), `kernels/<sha256>.json` (kernel
facts cache), `baselines/<kernel sha256>.json` (vDSO baselines).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostguard.errors import DigestMismatchError, FormatError, HostguardError, UsageError
from hostguard.host import libvirt
from hostguard.host.libvirt import open_connection, qemu_monitor_hmp
from hostguard.memory import elfscan, vdso, vmcoreinfo
from hostguard.memory import kernel as kernelmod
from hostguard.memory.acquire import memory_dump
from hostguard.memory.analyze import AnalysisOptions, KernelMismatch, MemoryCheckUnavailable
from hostguard.memory.diskref import DiskFacts
from hostguard.memory.guestram import GuestRamError
from hostguard.memory.hold import release_abandoned_holds
from hostguard.memory.initrd import InitrdContents, read_initrd
from hostguard.memory.judge import compare_memory, elf_page_unlisted, unavailable
from hostguard.memory.live import DumpSource, LiveSource, live_guest
from hostguard.memory.model import NOT_IN_USE, ElfPage, MemorySnapshot
from hostguard.memory.walk import MemoryFault
from hostguard.record import Record, field
from hostguard.signed.findings import CHECK_UNAVAILABLE, UNKNOWN_KERNEL, Finding
from hostguard.signed.manifest import Manifest

if TYPE_CHECKING:
    from hostguard.memory.live import MemorySource

log = logging.getLogger(__name__)
IN_PLACE_PATH = "memory:in-place"  # the note saying a check read guest RAM through a dump instead


class MemoryReport(Record, frozen=False):
    domain: str
    findings: list[Finding]
    snapshot: MemorySnapshot | None
    elf_pages: list[ElfPage] | None
    unavailable: str | None  # why the process/module analysis could not run
    kernel_sha256: str | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: dump, analysis, held, elf_scan, total
    dump_bytes: int = 0  # written to disk (the dump path)
    method: str = "dump-file"  # in-place, dump, dump-fallback, dump-file (inspect_dump)
    bytes_read: int = 0  # of guest RAM, in place

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "findings": [f.to_json() for f in self.findings],
            "snapshot": self.snapshot.to_json() if self.snapshot else None,
            "elf_pages": [p.to_json() for p in self.elf_pages] if self.elf_pages is not None else None,
            "unavailable": self.unavailable,
            "kernel_sha256": self.kernel_sha256,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "dump_bytes": self.dump_bytes,
            "method": self.method,
            "bytes_read": self.bytes_read,
        }

    def unjudged_elf_pages(self) -> dict[str, int]:
        """How many ELF header pages were not judged, by use (slab, free): stale bytes, not code."""
        return {use: sum(p.use == use for p in self.elf_pages or ()) for use in sorted(NOT_IN_USE)}


class Inputs(Record):
    """The trusted side: manifest, and the manifest-listed kernel/initrd files (digest-checked here)."""

    manifest: Manifest
    kernel_path: Path | None = None
    initrd_path: Path | None = None
    disk: DiskFacts | None = None  # from hostguard.memory.diskref.disk_facts on the verified images
    options: AnalysisOptions = field(default_factory=AnalysisOptions)


def _listed_digests(manifest: Manifest, what: str) -> set[str]:
    out = set()
    blob = getattr(manifest.boot, what, None) if manifest.boot is not None else None
    if blob is not None:
        out.add(blob.sha256)
    prefixes = ("/boot/vmlinuz",) if what == "kernel" else ("/boot/initrd", "/boot/initramfs")
    out |= {f.sha256 for f in manifest.files if f.path.startswith(prefixes)}
    return out


_digests: dict[tuple[str, int, int, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its identity and change time stay the same (a daemon checks the
    same kernel and initrd every few minutes; ctime changes with any write and cannot be set back)."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _digests.get(key)
    if digest is None:
        digest = kernelmod.file_sha256(path)
        if len(_digests) > 256:
            _digests.clear()
        _digests[key] = digest
    return digest


def verified_file(manifest: Manifest, path: Path, what: str) -> str:
    """sha256 of `path`, which must be the manifest's boot.<what> or one of its /boot files."""
    digest = _file_sha256(path)
    if digest not in _listed_digests(manifest, what):
        raise DigestMismatchError(f"{what} {path} is not the {what} the manifest lists (sha256 {digest[:16]}...)")
    return digest


def inspect_dump(dump: Path, inputs: Inputs, workdir: Path, *, domain: str = "") -> MemoryReport:
    """Analyse an existing ELF memory dump (see the module docstring). Raises only `HostguardError`s:
    a listed kernel/initrd that does not match the manifest, an unreadable dump or work directory."""

    return inspect_source(DumpSource(dump), inputs, workdir, domain=domain or str(dump))


_initrds: dict[str, InitrdContents] = {}


def _initrd(digest: str, path: Path) -> InitrdContents:
    """The initrd's contents, by digest (checked just before)."""
    if digest not in _initrds:
        if len(_initrds) > 64:
            _initrds.clear()
        _initrds[digest] = read_initrd(path)
    return _initrds[digest]


def inspect_source(source: MemorySource, inputs: Inputs, workdir: Path, *, domain: str) -> MemoryReport:
    """The inspection over any `MemorySource` (a dump, or guest RAM in place)."""
    try:
        report = _inspect(source, inputs, workdir, domain)
    except OSError as err:
        raise HostguardError(f"memory inspection of {domain}: {err.strerror or err}: {err.filename}") from None
    report.timings.update(source.timings)
    return report


def _inspect(source: MemorySource, inputs: Inputs, workdir: Path, domain: str) -> MemoryReport:
    started = time.monotonic()
    manifest = inputs.manifest
    kernel_sha = verified_file(manifest, inputs.kernel_path, "kernel") if inputs.kernel_path else None
    initrd: InitrdContents | None = None
    if inputs.initrd_path is not None:
        initrd = _initrd(verified_file(manifest, inputs.initrd_path, "initrd"), inputs.initrd_path)
    report = MemoryReport(domain, [], None, None, None, kernel_sha)
    cache = workdir / "kernels"

    info = None
    facts = None
    try:
        try:
            info = source.vmcoreinfo(None)
        except FormatError:
            if inputs.kernel_path is None:
                raise
            facts = kernelmod.load_facts(inputs.kernel_path, None, cache, sha256=kernel_sha)
            info = source.vmcoreinfo(facts.build_id)
        if info is None:
            raise MemoryCheckUnavailable(
                "no VMCOREINFO in guest memory (enable <vmcoreinfo state='on'/> and load qemu_fw_cfg in the guest)"
            )
        if inputs.kernel_path is not None:
            facts = kernelmod.load_facts(inputs.kernel_path, info, cache, sha256=kernel_sha)
        report.timings["kernel"] = time.monotonic() - started
        t = time.monotonic()
        report.snapshot = source.analyze(info, facts, inputs.options)
        if compare_memory(
            manifest.files,
            report.snapshot,
            disk=inputs.disk.reference if inputs.disk is not None else None,
            boot_modules=initrd.modules if initrd is not None else (),
            boot_files=initrd.files if initrd is not None else (),
        ):
            # A finding from a walk of a running guest is confirmed by a walk of the paused guest: a torn read
            # must never be what a verdict rests on.
            report.snapshot = source.recheck_paused(info, facts, inputs.options) or report.snapshot
        report.timings["analysis"] = time.monotonic() - t
        for w in report.snapshot.warnings:
            log.warning("%s: %s", domain, w)
    except MemoryCheckUnavailable as err:
        report.unavailable = err.message
    except KernelMismatch as err:
        report.unavailable = err.message
        report.findings.append(Finding(UNKNOWN_KERNEL, "kernel", f"build id {err.expected}", f"build id {err.found}"))
    except FormatError as err:  # malformed guest memory or VMCOREINFO, or a kernel file that does not parse
        report.unavailable = f"cannot analyse: {err}"

    elf_reason = None
    baseline = None
    known: set[str] = set()
    if facts is None or info is None or info.kernel_offset is None or info.phys_base is None:
        elf_reason = "no usable kernel file and VMCOREINFO to place the kernel image"
    elif inputs.disk is None:
        elf_reason = "no disk reference to match pages with files"
    else:
        t = time.monotonic()
        image = elfscan.kernel_physical_range(*kernelmod.image_range(facts), info.kernel_offset, info.phys_base)
        try:
            report.elf_pages = source.elf_pages(image, facts.symbols)
        except FormatError as err:
            elf_reason = f"guest memory cannot be scanned: {err}"
        report.timings["elf_scan"] = time.monotonic() - t
        stored = elfscan.BaselineStore(workdir / "baselines").load(facts.sha256)
        baseline = stored.pages if stored is not None else None
        if report.elf_pages is not None and facts.vdso:
            own = kernel_own_pages(source, facts, info.kernel_offset, info.phys_base, report.elf_pages)
            baseline = own | (baseline or frozenset())
        known = set(inputs.disk.heads) | {facts.head_page_sha256}
        if initrd is not None:
            known |= initrd.elf_heads
        if report.elf_pages:
            # As with the process walk: a finding must not rest on a page read while the guest changed it.
            placed: list[ElfPage] = []
            suspect: list[ElfPage] = []
            for page in report.elf_pages:
                (suspect if elf_page_unlisted(page, known, baseline) else placed).append(page)
            if suspect:
                report.elf_pages = placed + source.confirm_elf_pages(suspect, image, info, facts.symbols)
                unjudged = {use: n for use, n in report.unjudged_elf_pages().items() if n}
                if unjudged:
                    said = ", ".join(f"{n} {use}" for use, n in unjudged.items())
                    log.info("%s: ELF header pages not judged, stale bytes in pages not in use: %s", domain, said)
    report.findings += compare_memory(
        manifest.files,
        report.snapshot,
        unavailable_reason=report.unavailable,
        disk=inputs.disk.reference if inputs.disk is not None else None,
        boot_modules=initrd.modules if initrd is not None else (),
        boot_files=initrd.files if initrd is not None else (),
        elf_pages=report.elf_pages,
        known_heads=known,
        baseline=baseline,
        elf_unavailable_reason=elf_reason,
    )
    report.timings["total"] = time.monotonic() - started
    return report


def kernel_own_pages(
    source: MemorySource, facts: kernelmod.KernelFacts, kernel_offset: int, phys_base: int, pages: list[ElfPage]
) -> frozenset[str]:
    """Digests of the ELF pages that are the signed kernel's own vDSO images, where the kernel put them and as
    it patches them at boot (`hostguard.memory.vdso`). Any other ELF page in the kernel image is a finding."""

    at = {p.address: p for p in pages if p.in_kernel_image}
    own = set()
    for image in facts.vdso_images():
        start, _ = elfscan.kernel_physical_range(image.vaddr, image.vaddr + 1, kernel_offset, phys_base)
        page = at.get(start)
        if page is None:
            continue
        try:
            running = source.read_physical(start, len(image.data))
        except MemoryFault:
            continue
        if vdso.matches(image, running):
            own.add(page.sha256)
    return frozenset(own)


def _domain(conn: libvirt.Connection, name: str) -> libvirt.Domain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        raise UsageError(f"no domain {name!r}: {err.get_error_message()}") from None


def inspect_domain_memory(
    domain_name: str,
    manifest: Manifest,
    kernel_path: Path | None,
    workdir: Path,
    *,
    conn: libvirt.Connection | None = None,
    initrd_path: Path | None = None,
    disk: DiskFacts | None = None,
    suspend: bool = False,
    options: AnalysisOptions | None = None,
    method: str = "auto",
    marker_dir: Path | None = None,
    pause: str = "always",
) -> MemoryReport:
    """Inspect the memory of running domain `domain_name` (qemu:///system unless `conn` is given).

    `method` "in-place" reads guest RAM in the QEMU process (nothing written anywhere; with `pause` "always"
    the guest is paused for the kernel-list walk only, at most `hold.HOLD_LIMIT`; "on-inconsistency" walks
    the running guest and again paused only when that walk was torn or gave a finding); "dump" takes a
    memory-only dump into `workdir`; "auto" reads in place and falls back to the dump when that is
    impossible, saying so in a `check-unavailable` note (path `memory:in-place`). `marker_dir` holds the
    markers of guests paused by a walk (default `<workdir>/holds`; the daemon passes one in /run).
    `suspend` keeps the guest paused for the whole dump (dump path only)."""
    if method not in ("auto", "in-place", "dump") or pause not in ("on-inconsistency", "always", "never"):
        raise UsageError(f"unknown memory read method {method!r} or pause policy {pause!r}")
    if conn is None:
        conn = open_connection()
    dom = _domain(conn, domain_name)
    inputs = Inputs(manifest, kernel_path, initrd_path, disk, options or AnalysisOptions())
    fallback_reason = None
    if method != "dump":
        try:
            return _inspect_in_place(dom, inputs, workdir, marker_dir or workdir / "holds", pause)
        except GuestRamError as err:
            if method == "in-place":
                raise
            fallback_reason = err.message
            log.warning("%s: guest memory cannot be read in place (%s): taking a whole-RAM dump", domain_name, err)
    report = _inspect_dump_of(dom, inputs, workdir, suspend=suspend)
    if fallback_reason is not None:
        report.findings.append(
            Finding(
                CHECK_UNAVAILABLE,
                IN_PLACE_PATH,
                "guest RAM read in place",
                f"read through a whole-RAM dump instead ({report.dump_bytes >> 20} MiB written): {fallback_reason}",
            )
        )
        report.method = "dump-fallback"
    return report


def _inspect_in_place(dom: libvirt.Domain, inputs: Inputs, workdir: Path, marker_dir: Path, pause: str) -> MemoryReport:

    started = time.monotonic()
    release_abandoned_holds(dom.connect(), marker_dir)
    guest = live_guest(dom, lambda command: qemu_monitor_hmp(dom, command))
    source = LiveSource(guest, dom, marker_dir, pause)
    source.timings["open"] = time.monotonic() - started
    report = inspect_source(source, inputs, workdir, domain=dom.name())
    report.method = "in-place"
    report.bytes_read = source.bytes_read
    report.timings["total"] = time.monotonic() - started
    return report


def _inspect_dump_of(dom: libvirt.Domain, inputs: Inputs, workdir: Path, *, suspend: bool) -> MemoryReport:

    started = time.monotonic()
    with memory_dump(dom, workdir, suspend=suspend) as dump:
        report = inspect_dump(dump.path, inputs, workdir, domain=dom.name())
        report.timings.update({f"acquire_{k}": v for k, v in dump.timings.items()})
        report.dump_bytes = dump.size
    report.method = "dump"
    report.timings["dump"] = dump.seconds
    report.timings["total"] = time.monotonic() - started
    return report


def record_vdso_baseline(
    domain_name: str,
    manifest: Manifest,
    kernel_path: Path,
    workdir: Path,
    *,
    conn: libvirt.Connection | None = None,
    initrd_path: Path | None = None,
    disk: DiskFacts | None = None,
) -> elfscan.Baseline:
    """From a TRUSTED reference boot of `kernel_path` (freshly started, nothing else run): store the ELF
    pages inside the kernel image that are no known file (the vDSOs) as this kernel's baseline."""

    if conn is None:
        conn = open_connection()
    dom = _domain(conn, domain_name)
    with memory_dump(dom, workdir) as dump:
        return baseline_from_dump(dump.path, manifest, kernel_path, workdir, initrd_path=initrd_path, disk=disk)


def baseline_from_dump(
    dump: Path,
    manifest: Manifest,
    kernel_path: Path,
    workdir: Path,
    *,
    initrd_path: Path | None = None,
    disk: DiskFacts | None = None,
) -> elfscan.Baseline:
    """`record_vdso_baseline` on an existing dump of a trusted reference boot."""
    kernel_sha = verified_file(manifest, kernel_path, "kernel")
    known: set[str] = set(disk.heads) if disk is not None else set()
    if initrd_path is not None:
        verified_file(manifest, initrd_path, "initrd")
        known |= read_initrd(initrd_path).elf_heads
    info = vmcoreinfo.from_dump(dump)
    if info is None or info.kernel_offset is None or info.phys_base is None:
        raise MemoryCheckUnavailable("the reference dump has no usable VMCOREINFO")
    facts = kernelmod.load_facts(kernel_path, info, workdir / "kernels", sha256=kernel_sha)
    if facts.build_id != info.build_id:
        raise KernelMismatch(facts.build_id or "(none)", info.build_id or "(none)")
    image = elfscan.kernel_physical_range(*kernelmod.image_range(facts), info.kernel_offset, info.phys_base)
    pages = elfscan.scan_dump(dump, kernel_image=image)
    known.add(facts.head_page_sha256)
    candidates = elfscan.baseline_candidates(pages, known)
    if not candidates:
        raise MemoryCheckUnavailable("the reference dump shows no ELF page in the kernel image: nothing to record")
    return elfscan.BaselineStore(workdir / "baselines").record(facts.sha256, candidates)


__all__ = [
    "Inputs",
    "MemoryReport",
    "baseline_from_dump",
    "inspect_domain_memory",
    "inspect_dump",
    "record_vdso_baseline",
    "unavailable",
]
