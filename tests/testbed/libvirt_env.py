"""A libvirt fixture on the real qemu:///system: defines test domains and always removes them again.

Every domain gets a per-run name prefix (`hgt-<pid>-<random>-`), `type='qemu'` (TCG: no KVM here), direct
kernel boot, `<vmcoreinfo state='on'/>`, a virtio root disk with an explicit driver type, its serial console
logged to a file, no network and no graphics. Disks are per-test copies (or overlays) in a work directory
QEMU can reach (libvirt runs QEMU as libvirt-qemu and relabels the files it uses), so tests can tamper
with them without touching the cache. `close()` destroys and undefines every domain it defined and removes
its files, also when the test failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
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
RECONNECT_GRACE = 30.0
HOST_LOCK = Path("/run/lock/hostguard-testbed.lock")
HOST_LOCK_TIMEOUT = 1800.0
HOST_TURNSTILE = Path("/run/lock/hostguard-testbed.turnstile")

Domain = Any  # libvirt.virDomain (libvirt has no type information)


# --- host-wide coordination -----------------------------------------------------------------------------------
# Test runs share one libvirtd. A test that changes it for everybody (installs the hostguard hook, restarts
# libvirtd) takes `host_exclusive()`; every LibvirtEnv holds the same lock shared while it exists. So such a
# test waits until no other run has domains, and other runs wait until it is done. flock alone lets new shared
# holders overtake a waiting exclusive one for ever (several sessions in turn): a turnstile that an exclusive
# waiter holds, and that every new shared holder passes through, lets the shared holders drain first.

_exclusive_depth = 0
_shared_envs = 0


def _lock(fd: int, op: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {HOST_LOCK} still held after {timeout:.0f} s") from None
            time.sleep(0.2)


@contextlib.contextmanager
def host_exclusive(timeout: float = HOST_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the test bed's host-wide lock exclusively (for hook installs and libvirtd restarts). Take it
    before creating this test's LibvirtEnv; envs created inside it do not lock again."""
    global _exclusive_depth
    if _shared_envs and not _exclusive_depth:
        raise RuntimeError("host_exclusive() must be entered before this process creates a LibvirtEnv")
    if _exclusive_depth:
        _exclusive_depth += 1
        try:
            yield
        finally:
            _exclusive_depth -= 1
        return
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with _turnstile(timeout, "host_exclusive"):  # held while waiting: no new shared holder gets in
            _lock(fd, fcntl.LOCK_EX, timeout, "host_exclusive")
        _exclusive_depth = 1
        try:
            yield
        finally:
            _exclusive_depth = 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def _turnstile(timeout: float, what: str) -> Iterator[None]:
    fd = os.open(HOST_TURNSTILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock(fd, fcntl.LOCK_EX, timeout, what)
        yield
    finally:
        os.close(fd)


def _take_shared() -> int | None:
    global _shared_envs
    if _exclusive_depth:
        return None
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _shared_envs:  # a process that already holds it shared must not queue behind a waiting writer
            with _turnstile(HOST_LOCK_TIMEOUT, "LibvirtEnv"):
                pass
        _lock(fd, fcntl.LOCK_SH, HOST_LOCK_TIMEOUT, "LibvirtEnv")
    except BaseException:
        os.close(fd)
        raise
    _shared_envs += 1
    return fd


def _release_shared(fd: int | None) -> None:
    global _shared_envs
    if fd is not None:
        os.close(fd)
        _shared_envs -= 1


class ConsoleTimeout(AssertionError):
    """The expected text did not appear on a domain's serial console in time (or the domain stopped)."""


@dataclass(frozen=True)
class Disk:
    """An extra disk: `path` as virtio `target` (vdb, vdc, ... in order when None), driver type `format`."""

    path: Path
    format: str = "qcow2"
    readonly: bool = False
    target: str | None = None


def ensure_libvirtd(grace: float = 0.0) -> None:
    """Start libvirtd (scripts/libvirtd.sh) if its socket is missing or does not answer. With `grace`, first
    wait that long for it to come back by itself (someone else may be restarting it)."""
    deadline = time.monotonic() + grace
    while True:
        if SOCKET.is_socket() and _socket_answers():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    subprocess.run(["bash", str(REPO / "scripts" / "libvirtd.sh"), "start"], check=True, capture_output=True)


def open_connection(uri: str = URI, *, grace: float = 0.0) -> Any:
    """A connection to `uri`; for qemu:///system, libvirtd is started first when it is not running."""
    import libvirt

    if uri == URI:
        ensure_libvirtd(grace)
    return libvirt.open(uri)


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
        self.prefix = f"hgt-{os.getpid()}-{secrets.token_hex(3)}-"
        self.uri = uri
        self.names: list[str] = []
        self.consoles: dict[str, Path] = {}
        self._boot_copies: dict[Path, Path] = {}
        self.workdir = work_root / self.prefix.rstrip("-")
        # Only the host's libvirtd is shared with other runs; libvirt's in-process test driver is not.
        self._host_lock = _take_shared() if uri == URI else None
        try:
            self.conn = open_connection(uri)
            work_root.mkdir(parents=True, exist_ok=True)
            os.chmod(work_root, 0o755)
            self.workdir.mkdir(mode=0o755)
            os.chmod(self.workdir, 0o755)
        except BaseException:
            _release_shared(self._host_lock)
            raise

    def connection(self) -> Any:
        """The connection, reopened if libvirtd was restarted meanwhile (hook installs restart it)."""
        import libvirt

        try:
            if self.conn.isAlive():
                return self.conn
        except libvirt.libvirtError:
            pass  # a dead connection raises instead of answering 0: reopen below
        self.conn = open_connection(self.uri, grace=RECONNECT_GRACE)
        return self.conn

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

    def tampered_copy(self, signed: Path, filename: str) -> Path:
        """A private copy of a signed image with one byte flipped (1 MiB in), beside a copy of its signature:
        what an attacker who can write the image but not sign gets to start."""
        dest = self.copy_disk(signed, filename)
        shutil.copyfile(f"{signed}.hgsig", f"{dest}.hgsig")
        with dest.open("r+b") as fh:
            fh.seek(1 << 20)
            byte = fh.read(1)
            fh.seek(1 << 20)
            fh.write(bytes([byte[0] ^ 0xFF]))
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
        kernel: Path | None = None,
        initrd: Path | None = None,
    ) -> str:
        full = self.domain_name(name)
        kernel = kernel or self._boot_file(guest.kernel)
        initrd = initrd or self._boot_file(guest.initrd)
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
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
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
        kernel: Path | None = None,
        initrd: Path | None = None,
    ) -> Domain:
        """Define (not start) domain `<prefix><name>` booting `guest`. Without `disk_path` the root disk is a
        private copy of `guest.root_qcow2` (or of `root_raw` when disk_format='raw'); without `kernel` /
        `initrd`, private copies of the guest's (one per environment). Given paths are used as they are."""
        if disk_path is None:
            src = guest.root_raw if disk_format == "raw" else guest.root_qcow2
            disk_path = self.copy_disk(src, f"{name}-root.{disk_format}")
        xml = self.domain_xml(
            name,
            guest,
            disk_path=disk_path,
            disk_format=disk_format,
            extra_disks=extra_disks,
            metadata_xml=metadata_xml,
            cmdline_extra=cmdline_extra,
            memory_mib=memory_mib,
            kernel=kernel,
            initrd=initrd,
        )
        full = self.domain_name(name)
        self.names.append(full)  # before defining: close() must clean up even a half-made domain
        self.consoles[full] = self.path(f"{name}-console.log")
        return self.connection().defineXML(xml)

    def define_numa_guest(self, name: str, guest: Guest, *, disk_path: Path) -> Domain:
        """Like define_guest, with two vCPUs in two NUMA cells of one size (2 x 128 MiB): two RAM blocks of one
        size in QEMU, which /proc/PID/maps cannot tell apart, so the memory stage reads such a guest through a
        whole-RAM dump instead of in place."""
        xml = self.domain_xml(name, guest, disk_path=disk_path).replace(
            "<vcpu>1</vcpu>",
            "<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0' memory='128' unit='MiB'/>"
            "<cell id='1' cpus='1' memory='128' unit='MiB'/></numa></cpu>",
        )
        full = self.domain_name(name)
        self.names.append(full)
        self.consoles[full] = self.path(f"{name}-console.log")
        return self.connection().defineXML(xml)

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
        """Destroy and undefine every domain this environment defined, then remove its work directory.
        Survives a libvirtd restart during the test: it reconnects and tries once more."""
        import libvirt

        errors: dict[str, str] = {}
        for attempt in range(2):
            errors.clear()
            for full in reversed(self.names):
                try:
                    self._remove_domain(full)
                except libvirt.libvirtError as err:
                    errors[full] = str(err)
            if not errors or attempt:
                break
            try:
                self.connection()
            except (libvirt.libvirtError, OSError, subprocess.CalledProcessError) as err:
                errors["reconnect"] = str(err)
                break
        self.names.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _release_shared(self._host_lock)
        self._host_lock = None
        with contextlib.suppress(libvirt.libvirtError):  # dead after a libvirtd restart: nothing to close
            self.conn.close()
        if errors:
            detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
            raise RuntimeError(f"libvirt test bed cleanup failed (remove by hand with virsh): {detail}")

    def _remove_domain(self, full: str) -> None:
        import libvirt

        try:
            dom = self.conn.lookupByName(full)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise
        if dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # it stopped meanwhile
                    raise
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

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
