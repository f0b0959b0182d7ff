"""Acquisition: a memory-only dump of a running domain, through libvirt, into a root-only file.

`virDomainCoreDumpWithFormat(path, VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, VIR_DUMP_MEMORY_ONLY)` makes QEMU write
guest RAM as an ELF core (with the VMCOREINFO note when the guest published one). QEMU stops the vCPUs while it
writes, so the dump is self-consistent; `suspend=True` additionally keeps the domain paused from before the
dump until the caller has finished with it (analysis included), for a verdict about exactly that state.

The file lives in `<workdir>/dumps` (mode 0700, root), is 0600, and is removed when the context exits, also
on errors. There must be room for the guest's whole memory: checked before dumping.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from hostguard.errors import HostguardError
from hostguard.host import libvirt
from hostguard.record import Record, field

SPACE_MARGIN = 64 << 20


class AcquisitionError(HostguardError):
    """The dump could not be taken (libvirt refused, no space, the domain is not running)."""


class Dump(Record, frozen=False):
    path: Path
    seconds: float = 0.0
    size: int = 0
    suspended: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def dump_dir(workdir: Path) -> Path:
    d = workdir / "dumps"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.geteuid():
        raise AcquisitionError(f"{d} is not owned by this user: refusing to dump guest memory there")
    os.chmod(d, 0o700)
    return d


def _memory_bytes(dom: libvirt.Domain) -> int:
    # info(): [state, maxMem KiB, memory KiB, nrVirtCpu, cpuTime]
    return int(dom.info()[1]) * 1024


@contextlib.contextmanager
def memory_dump(dom: libvirt.Domain, workdir: Path, *, suspend: bool = False) -> Iterator[Dump]:
    """Dump `dom` (a libvirt virDomain) and yield the `Dump`; the file is removed afterwards."""
    directory = dump_dir(workdir)
    try:
        if not dom.isActive():
            raise AcquisitionError(f"domain {dom.name()} is not running")
        need = _memory_bytes(dom) + SPACE_MARGIN
    except libvirt.libvirtError as err:
        raise AcquisitionError(f"domain {_name(dom)}: {err.get_error_message()}") from None
    free = shutil.disk_usage(directory).free
    if free < need:
        raise AcquisitionError(f"{directory}: {free >> 20} MiB free, the dump needs {need >> 20} MiB")
    path = directory / f"{dom.UUIDString()}-{secrets.token_hex(4)}.core"
    # Create it ourselves (0600, exclusive) so the name cannot be pre-placed as a link; libvirt truncates it.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    dump = Dump(path)
    paused_by_us = False
    try:
        if suspend:
            started = time.monotonic()
            try:
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    dom.suspend()
                    paused_by_us = True
            except libvirt.libvirtError as err:
                raise AcquisitionError(f"cannot suspend {_name(dom)}: {err.get_error_message()}") from None
            dump.suspended = paused_by_us
            dump.timings["suspend"] = time.monotonic() - started
        started = time.monotonic()
        try:
            dom.coreDumpWithFormat(str(path), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY)
        except libvirt.libvirtError as err:
            raise AcquisitionError(f"memory dump of {_name(dom)} failed: {err.get_error_message()}") from None
        dump.seconds = dump.timings["dump"] = time.monotonic() - started
        os.chmod(path, 0o600)
        dump.size = path.stat().st_size
        yield dump
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if paused_by_us:
            try:
                dom.resume()
            except libvirt.libvirtError as err:
                why = err.get_error_message()
                raise AcquisitionError(f"cannot resume {_name(dom)} after the dump: {why}") from None


def _name(dom: libvirt.Domain) -> str:
    return str(dom.name())  # virDomainGetName is local: no call to libvirtd
