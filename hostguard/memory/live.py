"""Guest memory read in place, as the inspection reads it: `LiveSource` (and `DumpSource`, the fallback).

Both give the inspection the same four things: VMCOREINFO, the process/module walk, the ELF pages of guest
RAM, and reads of guest-physical memory. `LiveSource` keeps, per running guest (domain UUID, QEMU pid and
its start time), what it learned: the RAM layout, where the kernel's VMCOREINFO copies are (found once by a
scan of the RAM the guest has used, then re-read and compared each check) and the drgn Program. A daemon
therefore pays the scan once per guest boot; a periodic check reads a few MiB.

Only the walk needs a consistent view: by default it runs inside `hold.held_for_walk`, the guest paused for
that walk only (10-25 ms). With `pause="on-inconsistency"` it runs with the guest running and again paused
when it met anything torn or gave a finding (docs/adr/0012-memory-in-place.md says why that is not the
default). The ELF scan looks at each page on its own and always runs with the guest running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hostguard.errors import FormatError
from hostguard.host import libvirt
from hostguard.host.libvirt import qemu_pid
from hostguard.memory import elfscan, structpage, vmcoreinfo
from hostguard.memory import kernel as kernelmod
from hostguard.memory.analyze import (
    AnalysisOptions,
    MemoryCheckUnavailable,
    analyze_dump,
    analyze_program,
    check_kernel,
    open_live_program,
)
from hostguard.memory.guestram import GuestRam, GuestRamError, layout_unchanged, open_guest_ram
from hostguard.memory.hold import held_for_walk
from hostguard.memory.kernelranges import bounce_buffer_range, page_array_ranges
from hostguard.memory.model import UNREADABLE, ElfPage, MemorySnapshot
from hostguard.memory.vmcoreinfo import VmcoreInfo
from hostguard.memory.walk import MemoryFault
from hostguard.record import Record, field, replace

log = logging.getLogger(__name__)

MAX_CACHED_GUESTS = 256


class MemorySource(Protocol):
    """Where the inspection reads guest memory from."""

    timings: dict[str, float]

    def vmcoreinfo(self, expected_build_id: str | None) -> VmcoreInfo | None:
        """None: the kernel published none (not booted yet, or no vmcoreinfo device). FormatError: ambiguous."""
        ...

    def analyze(
        self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions
    ) -> MemorySnapshot: ...

    def recheck_paused(
        self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions
    ) -> MemorySnapshot | None:
        """A walk with the guest paused, to confirm what a walk of the running guest found; None: the first
        walk was consistent already (a dump, or a walk that was paused)."""
        ...

    def elf_pages(self, kernel_image: tuple[int, int], kernel_symbols: dict[str, int]) -> list[ElfPage]:
        """ELF header pages; `kernel_symbols`: link-time addresses from the signed kernel file."""
        ...

    def confirm_elf_pages(
        self, pages: list[ElfPage], kernel_image: tuple[int, int], info: VmcoreInfo, kernel_symbols: dict[str, int]
    ) -> list[ElfPage]:
        """`pages` (found by `elf_pages`) as they read with the guest paused: those still ELF header pages, each
        with what the guest kernel uses it for (`structpage`)."""
        ...

    def read_physical(self, address: int, size: int) -> bytes:
        """`MemoryFault` when not RAM."""
        ...


class DumpSource(Record, frozen=False):
    """A memory-only ELF dump file (the fallback path, and `hostguard memory inspect --dump`)."""

    path: Path
    timings: dict[str, float] = field(default_factory=dict)

    def vmcoreinfo(self, expected_build_id: str | None) -> VmcoreInfo | None:
        return vmcoreinfo.from_dump(self.path, expected_build_id=expected_build_id)

    def analyze(self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions) -> MemorySnapshot:
        return analyze_dump(self.path, info, facts, opts)

    def recheck_paused(
        self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions
    ) -> MemorySnapshot | None:
        return None  # a dump is one consistent moment

    def elf_pages(self, kernel_image: tuple[int, int], kernel_symbols: dict[str, int]) -> list[ElfPage]:
        return elfscan.scan_dump(self.path, kernel_image=kernel_image)

    def confirm_elf_pages(
        self, pages: list[ElfPage], kernel_image: tuple[int, int], info: VmcoreInfo, kernel_symbols: dict[str, int]
    ) -> list[ElfPage]:
        if not pages:
            return pages  # a dump is one consistent moment: only the pages' use is still to be read
        with elfscan.open_dump(self.path) as (read, ram_end):
            return structpage.with_uses(pages, read, info, ram_end, kernel_symbols.get("vmemmap_base"))

    def read_physical(self, address: int, size: int) -> bytes:
        return elfscan.read_dump_physical(self.path, address, size)


class LiveGuest(Record, frozen=False):
    """What is kept about one running guest between checks."""

    key: tuple[str, int, int]  # domain UUID, QEMU pid, QEMU start time
    ram: GuestRam
    info: VmcoreInfo | None = None
    info_at: list[int] = field(default_factory=list)  # guest-physical addresses of its VMCOREINFO copies
    prog: Any = None

    def close(self) -> None:
        self.ram.close()


_guests: dict[str, LiveGuest] = {}
_guests_lock = threading.Lock()


def live_guest(dom: libvirt.Domain, monitor: Callable[[str], str]) -> LiveGuest:
    """The kept state of `dom`'s running QEMU, opened (QEMU monitor, /proc) when new or restarted."""

    uuid = dom.UUIDString()
    pid = qemu_pid(dom.name())
    if pid is None:
        raise GuestRamError(f"no QEMU process known for {dom.name()}")
    with _guests_lock:
        kept = _guests.get(uuid)
        same = kept is not None and kept.key[1] == pid and kept.ram.same_process()
        if kept is not None and same and layout_unchanged(kept.ram, monitor):  # memory may have been hot-plugged
            return kept
        if kept is not None:
            kept.close()
            del _guests[uuid]
        ram = open_guest_ram(pid, uuid, monitor)
        guest = LiveGuest((uuid, pid, ram.start_time), ram)
        if len(_guests) >= MAX_CACHED_GUESTS:
            _guests.pop(next(iter(_guests))).close()
        _guests[uuid] = guest
        return guest


def forget_guest(uuid: str) -> None:
    """Drop what is kept about a guest (the daemon calls this when a domain stops)."""
    with _guests_lock:
        kept = _guests.pop(uuid, None)
    if kept is not None:
        kept.close()


def _torn(snapshot: MemorySnapshot) -> bool:
    """Signs that the guest changed what was being read: a list that did not hold together, or a process
    whose executable could not be followed. A consistent walk (guest paused) settles whether that is damage."""
    return bool(snapshot.anomalies) or any(p.status == UNREADABLE for p in snapshot.processes)


class LiveSource(Record, frozen=False):
    """Guest RAM of a running domain read in place (see the module docstring)."""

    guest: LiveGuest
    dom: libvirt.Domain
    marker_dir: Path
    pause: str = "always"  # or "on-inconsistency", "never" (docs/adr/0012-memory-in-place.md)
    timings: dict[str, float] = field(default_factory=dict)
    bytes_read_before: int = 0

    def __post_init__(self) -> None:
        self.bytes_read_before = self.guest.ram.bytes_read

    @property
    def bytes_read(self) -> int:
        return self.guest.ram.bytes_read - self.bytes_read_before

    def vmcoreinfo(self, expected_build_id: str | None) -> VmcoreInfo | None:
        g = self.guest
        if g.info is not None and self._still_there(g.info, g.info_at):
            return g.info
        g.info, g.info_at, g.prog = None, [], None
        t = time.monotonic()
        found = vmcoreinfo.Candidates(expected_build_id)
        try:
            for gpa, data in g.ram.chunks():
                pos = data.find(b"OSRELEASE=")
                while pos >= 0:
                    text = data[pos : pos + vmcoreinfo.MAX_VMCOREINFO_BYTES + 1]
                    if len(text) <= vmcoreinfo.MAX_VMCOREINFO_BYTES:  # runs on past this chunk
                        text = self._read_upto(gpa + pos, vmcoreinfo.MAX_VMCOREINFO_BYTES + 1)
                    found.consider(gpa + pos, text)
                    pos = data.find(b"OSRELEASE=", pos + 10)
        finally:
            self.timings["vmcoreinfo_scan"] = time.monotonic() - t
        if not found:
            return None
        g.info, g.info_at = found.choice()
        return g.info

    def _read_upto(self, address: int, size: int) -> bytes:
        out = b""
        while len(out) < size:
            n = min(size - len(out), elfscan.PAGE - (address + len(out)) % elfscan.PAGE)
            try:
                out += self.guest.ram.read(address + len(out), n)
            except MemoryFault:
                break
        return out

    def _still_there(self, info: VmcoreInfo, addresses: list[int]) -> bool:
        """The kept VMCOREINFO copies still say the same (the guest did not reboot into another kernel)."""
        try:
            return all(self.guest.ram.read(a, len(info.raw)) == info.raw for a in addresses[:4])
        except MemoryFault:
            return False

    def analyze(self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions) -> MemorySnapshot:
        """Walk with the guest running; if the walk met anything torn (see `_torn`), walk again with the guest
        paused (at most `hold.HOLD_LIMIT`). `pause` "always" pauses for the first walk already."""
        check_kernel(info, facts)
        g = self.guest
        if g.prog is None:
            g.prog = open_live_program(g.ram, info)
        self.timings.setdefault("held", 0.0)
        if self.pause == "always":
            return self._walk_paused(info, facts, opts)
        started = time.monotonic()
        snapshot = self._walk(lambda: analyze_program(g.prog, info, facts, opts))
        self.timings["walk_running"] = time.monotonic() - started
        if _torn(snapshot) and self.pause != "never":
            return self._walk_paused(info, facts, opts)
        return snapshot

    def recheck_paused(
        self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions
    ) -> MemorySnapshot | None:
        if self.pause != "on-inconsistency" or "walk_paused" in self.timings:
            return None  # already paused (or pausing is off)
        return self._walk_paused(info, facts, opts)

    def _walk_paused(
        self, info: VmcoreInfo, facts: kernelmod.KernelFacts | None, opts: AnalysisOptions
    ) -> MemorySnapshot:
        g = self.guest
        started = time.monotonic()
        with held_for_walk(self.dom, self.marker_dir) as hold, g.ram.frozen():
            snapshot = self._walk(lambda: analyze_program(g.prog, info, facts, opts))
        self.timings["walk_paused"] = time.monotonic() - started
        self.timings["held"] = hold.seconds
        if hold.cut_short:
            message = "the walk outlasted the pause limit: the guest ran during part of it"
            snapshot = replace(snapshot, warnings=(*snapshot.warnings, message))
        return snapshot

    def _walk(self, walk: Callable[[], MemorySnapshot]) -> MemorySnapshot:
        try:
            return walk()
        except MemoryCheckUnavailable:
            g = self.guest
            g.info, g.info_at, g.prog = None, [], None  # look again next time (a reboot moves everything)
            raise

    def elf_pages(self, kernel_image: tuple[int, int], kernel_symbols: dict[str, int]) -> list[ElfPage]:
        ram, info = self.guest.ram, self.guest.info
        skip: list[tuple[int, int]] = []
        if info is not None:  # the kernel's own structures whose size follows the guest's RAM (ADR 0025)
            t = time.monotonic()
            skip = page_array_ranges(ram.read, info, ram.end, kernel_symbols.get("vmemmap_base"))
            skip += bounce_buffer_range(ram.read, info, kernel_symbols.get("io_tlb_default_mem"), ram.end)
            self.timings["kernel_ranges"] = time.monotonic() - t
            log.debug("ELF scan skips %d MiB of the kernel's page array", sum(b - a for a, b in skip) >> 20)
        try:
            pages = ram.page_heads(elfscan.ELF_MAGIC, skip)
            return elfscan.judge_pages(pages, kernel_image, elfscan.MAX_HITS)
        except GuestRamError as err:
            raise FormatError(f"guest RAM: {err.message}") from None

    def confirm_elf_pages(
        self, pages: list[ElfPage], kernel_image: tuple[int, int], info: VmcoreInfo, kernel_symbols: dict[str, int]
    ) -> list[ElfPage]:
        """The scan reads a running guest, and a page it read while the guest was filling it (a read from disk
        landing in the page cache) hashes as no file's: read those pages again with the guest paused, the way
        a process walk's findings are confirmed, and in the same pause what the guest kernel uses each page
        for (a slab or free page keeps stale bytes: `structpage`). A page that cannot be read again stays as
        it was. Pausing off: the use is read with the guest running."""
        if not pages:
            return pages
        ram = self.guest.ram
        vmemmap_base = kernel_symbols.get("vmemmap_base")
        if self.pause == "never":
            return structpage.with_uses(pages, ram.read, info, ram.end, vmemmap_base)
        again: list[tuple[int, bytes]] = []
        kept: list[ElfPage] = []
        with held_for_walk(self.dom, self.marker_dir) as hold:
            for page in pages:
                try:
                    again.append((page.address, ram.read(page.address, elfscan.PAGE)))
                except MemoryFault:
                    kept.append(page)
            confirmed = kept + elfscan.judge_pages(again, kernel_image, elfscan.MAX_HITS)
            confirmed = structpage.with_uses(confirmed, ram.read, info, ram.end, vmemmap_base)
        self.timings["held_elf_confirm"] = hold.seconds
        return confirmed

    def read_physical(self, address: int, size: int) -> bytes:
        return self.guest.ram.read(address, size)
