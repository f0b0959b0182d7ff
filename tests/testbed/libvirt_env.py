"""A libvirt fixture on the real qemu:///system: defines test domains and always removes them again.

Every domain gets a per-run name prefix (`hgt-<pid>-<random>-`), `type='qemu'` (TCG: no KVM here), direct
kernel boot, `<vmcoreinfo state='on'/>`, a virtio root disk with an explicit driver type, its serial console
logged to a file, no network and no graphics. Disks are per-test copies (or overlays) in a work directory
QEMU can reach (libvirt runs QEMU as libvirt-qemu and relabels the files it uses), so tests can tamper
with them without touching the cache. `close()` destroys and undefines every domain it defined and removes
its files, also when the test failed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from tests.testbed.guests import FAIL_MARKER, Guest
from tests.testbed.images import run

URI = "qemu:///system"
SOCKET = Path("/run/libvirt/libvirt-sock")
WORK_ROOT = Path("/var/lib/libvirt/images/hostguard-test")
REPO = Path(__file__).resolve().parents[2]
MEMORY_MIB = 256
DEFAULT_TIMEOUT = 120.0

Domain = Any  # libvirt.virDomain (libvirt has no type information)


class ConsoleTimeout(AssertionError):
    """The expected text did not appear on a domain's serial console in time (or the domain stopped)."""


@dataclass(frozen=True)
class Disk:
    """An extra disk: `path` as virtio `target` (vdb, vdc, ... in order when None), driver type `format`."""

    path: Path
    format: str = "qcow2"
    readonly: bool = False
    target: str | None = None


def ensure_libvirtd() -> None:
    """Start libvirtd (scripts/libvirtd.sh) if its socket is missing or does not answer."""
    if SOCKET.is_socket() and _socket_answers():
        return
    subprocess.run(["bash", str(REPO / "scripts" / "libvirtd.sh"), "start"], check=True, capture_output=True)


def _socket_answers() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(SOCKET))
        except OSError:
            return False
    return True


class LibvirtEnv:
    """Context manager owning the test domains and files of one test."""

    def __init__(self, uri: str = URI, *, work_root: Path = WORK_ROOT) -> None:
        import libvirt

        self.prefix = f"hgt-{os.getpid()}-{secrets.token_hex(3)}-"
        if uri == URI:
            ensure_libvirtd()
        self.conn = libvirt.open(uri)
        self.names: list[str] = []
        self.consoles: dict[str, Path] = {}
        work_root.mkdir(parents=True, exist_ok=True)
        os.chmod(work_root, 0o755)
        self.workdir = work_root / self.prefix.rstrip("-")
        self.workdir.mkdir(mode=0o755)
        os.chmod(self.workdir, 0o755)
        self._boot_copies: dict[Path, Path] = {}

    # --- files ---------------------------------------------------------------------------------------------

    def path(self, filename: str) -> Path:
        """A path inside this environment's work directory (removed on close)."""
        return self.workdir / filename

    def copy_disk(self, src: Path, filename: str) -> Path:
        """A private copy of `src` (sparse, permissions QEMU can use) to tamper with freely."""
        dest = self.path(filename)
        run(["cp", "--sparse=always", "--", src, dest])
        dest.chmod(0o644)
        return dest

    def overlay(self, backing: Path, filename: str, backing_format: str = "qcow2") -> Path:
        """A qcow2 overlay on `backing` with an explicit backing format (the backing file stays untouched)."""
        dest = self.path(filename)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing, dest])
        dest.chmod(0o644)
        return dest

    def _boot_file(self, src: Path) -> Path:
        if src not in self._boot_copies:
            dest = self.path(f"boot-{len(self._boot_copies)}-{src.name}")
            shutil.copyfile(src, dest)
            dest.chmod(0o644)
            self._boot_copies[src] = dest
        return self._boot_copies[src]

    # --- domains -------------------------------------------------------------------------------------------

    def domain_name(self, name: str) -> str:
        return self.prefix + name

    def domain_xml(
        self,
        name: str,
        guest: Guest,
        *,
        disk_path: Path,
        disk_format: str = "qcow2",
        extra_disks: Sequence[Disk | Path] = (),
        metadata_xml: str | None = None,
        cmdline_extra: str = "",
        memory_mib: int = MEMORY_MIB,
    ) -> str:
        full = self.domain_name(name)
        console = self.path(f"{name}-console.log")
        cmdline = " ".join(x for x in (guest.cmdline, cmdline_extra) if x)
        disks = [_disk_xml(Disk(disk_path, disk_format, target="vda"))]
        for n, extra in enumerate(extra_disks, start=1):
            d = extra if isinstance(extra, Disk) else Disk(extra, _guess_format(extra))
            target = d.target or "vd" + chr(ord("a") + n)
            disks.append(_disk_xml(Disk(d.path, d.format, d.readonly, target)))
        metadata = f"<metadata>{metadata_xml}</metadata>" if metadata_xml else ""
        return f"""<domain type='qemu'>
  <name>{escape(full)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  {metadata}
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{escape(str(self._boot_file(guest.kernel)))}</kernel>
    <initrd>{escape(str(self._boot_file(guest.initrd)))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><vmcoreinfo state='on'/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {"".join(disks)}
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={quoteattr(str(console))} append='off'/><target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(str(console))} append='off'/><target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def define_guest(
        self,
        name: str,
        guest: Guest,
        *,
        extra_disks: Sequence[Disk | Path] = (),
        metadata_xml: str | None = None,
        disk_path: Path | None = None,
        disk_format: str = "qcow2",
        cmdline_extra: str = "",
        memory_mib: int = MEMORY_MIB,
    ) -> Domain:
        """Define (not start) domain `<prefix><name>` booting `guest`. Without `disk_path` the root disk is a
        private copy of `guest.root_qcow2` (or of `root_raw` when disk_format='raw')."""
        if disk_path is None:
            src = guest.root_raw if disk_format == "raw" else guest.root_qcow2
            disk_path = self.copy_disk(src, f"{name}-root.{disk_format}")
        xml = self.domain_xml(
            name, guest, disk_path=disk_path, disk_format=disk_format, extra_disks=extra_disks,
            metadata_xml=metadata_xml, cmdline_extra=cmdline_extra, memory_mib=memory_mib,
        )
        full = self.domain_name(name)
        self.names.append(full)  # before defining: close() must clean up even a half-made domain
        self.consoles[full] = self.path(f"{name}-console.log")
        return self.conn.defineXML(xml)

    def boot(self, name: str, guest: Guest, *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Domain:
        """define_guest + start + wait for the guest's marker on its console."""
        dom = self.define_guest(name, guest, **kwargs)
        dom.create()
        self.wait_for_console(dom, guest.marker, timeout)
        return dom

    def console_path(self, domain: Domain) -> Path:
        return self.consoles[domain.name()]

    def console_text(self, domain: Domain) -> str:
        try:
            return self.console_path(domain).read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_console(self, domain: Domain, text: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Poll the serial log until `text` appears; return the whole log so far. Raises ConsoleTimeout on
        timeout, when the test bed's failure marker appears, or when the domain stops without printing it."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.console_text(domain)
            if text in log:
                return log
            if FAIL_MARKER in log:
                raise ConsoleTimeout(f"{domain.name()}: guest failed before {text!r}:\n{log[-3000:]}")
            if not domain.isActive():
                log = self.console_text(domain)
                if text in log:
                    return log
                raise ConsoleTimeout(f"{domain.name()}: stopped before printing {text!r}:\n{log[-3000:]}")
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"{domain.name()}: no {text!r} within {timeout:.0f} s:\n{log[-3000:]}")
            time.sleep(0.1)

    def wait_for_shutoff(self, domain: Domain, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while domain.isActive():
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"{domain.name()}: still running after {timeout:.0f} s")
            time.sleep(0.1)

    # --- cleanup -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy and undefine every domain this environment defined, then remove its work directory."""
        import libvirt

        errors: list[str] = []
        for full in reversed(self.names):
            try:
                dom = self.conn.lookupByName(full)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    errors.append(f"{full}: {err}")
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                )
            except libvirt.libvirtError as err:
                errors.append(f"{full}: {err}")
        self.names.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            self.conn.close()
        except libvirt.libvirtError as err:
            errors.append(f"close connection: {err}")
        if errors:
            raise RuntimeError("libvirt test bed cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> LibvirtEnv:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _guess_format(path: Path) -> str:
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def _disk_xml(d: Disk) -> str:
    ro = "<readonly/>" if d.readonly else ""
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type={quoteattr(d.format)}/>"
        f"<source file={quoteattr(str(d.path))}/><target dev={quoteattr(d.target or 'vdb')} bus='virtio'/>"
        f"{ro}</disk>\n    "
    )


def leftover_domains(conn: Any, prefixes: Iterable[str] = ("hgt-",)) -> list[str]:
    """Names of defined domains from test-bed runs whose process is gone (for a manual clean-up)."""
    out = []
    for dom in conn.listAllDomains():
        name = dom.name()
        if not name.startswith(tuple(prefixes)):
            continue
        parts = name.split("-")
        if len(parts) > 2 and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            out.append(name)
    return out
