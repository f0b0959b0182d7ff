"""`hostguard doctor`: is this host protected? Each check reads what libvirt, the hook and the daemon will
actually use, and says ok / warn / fail with what to do.

The hook is only as good as libvirtd's view of it: libvirtd looks for qemu hooks when it starts (or reloads on
SIGHUP) and caches "this driver has hooks"; at each call it rescans qemu.d/. So a 50-hostguard installed after
libvirtd started runs only if some qemu hook was already there at its start (see libvirt's virhook.c).

Everything the checks read from the machine goes through `HostView`, which tests point at temp directories.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import ConfigError, HostguardError
from hostguard.host import libvirt
from hostguard.host.config import config_path as default_config_path
from hostguard.host.config import load_config
from hostguard.host.libvirt import open_connection
from hostguard.host.services import libvirt_version
from hostguard.host.trustdir import read_trust_dir
from hostguard.record import Record, field

OK, WARN, FAIL = "ok", "warn", "fail"
HOOK_NAME = "50-hostguard"
HOOK_MARKER = b"# hostguard libvirt hook shim"
QEMU_D_SINCE = (6, 5)
LIBVIRT_DAEMONS = ("libvirtd", "virtqemud")  # whichever runs the qemu driver loads the qemu hooks
CRL_WARN_DAYS = 7
SPACE_FAIL = 100 * 1024 * 1024
SPACE_WARN = 1024 * 1024 * 1024


class Check(Record):
    name: str
    status: str  # ok | warn | fail
    message: str
    action: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "message": self.message, "action": self.action}


class HostView(Record, frozen=False):
    """Where doctor looks. Defaults are the real host."""

    proc: Path = Path("/proc")
    hooks_dir: Path = Path("/etc/libvirt/hooks")
    now: float = field(default_factory=lambda: dt.datetime.now(dt.UTC).timestamp())
    libvirt_version: Callable[[], tuple[int, int]] | None = None
    open_libvirt: Callable[[], Any] | None = None
    libvirt_clients: Callable[[], list[int]] | None = None  # pids of libvirtd's clients

    def version(self) -> tuple[int, int]:
        if self.libvirt_version is not None:
            return self.libvirt_version()

        return libvirt_version()

    def connect(self) -> Any:
        if self.open_libvirt is not None:
            return self.open_libvirt()

        return open_connection()

    def client_pids(self) -> list[int]:
        if self.libvirt_clients is not None:
            return self.libvirt_clients()
        return _virt_admin_client_pids()

    # --- /proc ---------------------------------------------------------------------------------------------

    def pids(self) -> Iterator[int]:
        for entry in self.proc.iterdir():
            if entry.name.isdigit():
                yield int(entry.name)

    def comm(self, pid: int) -> str:
        try:
            return (self.proc / str(pid) / "comm").read_text().strip()
        except OSError:
            return ""

    def start_time(self, pid: int) -> float | None:
        """Wall-clock start of a process: boot time + its start in clock ticks (proc(5), field 22)."""
        try:
            stat_line = (self.proc / str(pid) / "stat").read_text()
            btime = next(
                int(line.split()[1])
                for line in (self.proc / "stat").read_text().splitlines()
                if line.startswith("btime ")
            )
        except (OSError, StopIteration, ValueError):
            return None
        fields = stat_line[stat_line.rindex(")") + 2 :].split()  # after "(comm)", which may contain spaces
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")

    def socket_owner(self, path: Path) -> int | None:
        """The pid of the process listening on the Unix socket `path` (from /proc/net/unix and fd links)."""
        try:
            lines = (self.proc / "net" / "unix").read_text().splitlines()[1:]
        except OSError:
            return None
        inodes = {
            f"socket:[{parts[6]}]"
            for parts in (ln.split() for ln in lines)
            if len(parts) >= 8 and parts[7] == str(path)
        }
        if not inodes:
            return None
        for pid in self.pids():
            try:
                fds = list((self.proc / str(pid) / "fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd) in inodes:
                        return pid
                except OSError:
                    continue
        return None


def _virt_admin_client_pids() -> list[int]:
    """Pids of libvirtd's Unix-socket clients, from libvirt's admin interface (virt-admin)."""
    if shutil.which("virt-admin") is None:
        return []
    pids = []
    for daemon in LIBVIRT_DAEMONS:
        listing = subprocess.run(
            ["virt-admin", "srv-clients-list", daemon], capture_output=True, text=True, check=False, timeout=10
        )
        if listing.returncode != 0:
            continue
        for line in listing.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and parts[1] == "unix":
                info = subprocess.run(
                    ["virt-admin", "client-info", daemon, parts[0]],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=10,
                )
                found = re.search(r"^unix_process_id\s*:\s*(\d+)", info.stdout, re.MULTILINE)
                if found:
                    pids.append(int(found.group(1)))
    return pids


# --- checks ------------------------------------------------------------------------------------------------


def check_libvirt(view: HostView) -> tuple[list[Check], tuple[int, int] | None, tuple[str, int] | None]:
    """The libvirt version and its running daemon: (checks, version, (daemon name, pid))."""
    out: list[Check] = []
    version: tuple[int, int] | None = None
    try:
        version = view.version()
    except ConfigError as exc:
        out.append(Check("libvirt", FAIL, str(exc), "apt install libvirt-daemon-system"))
    if version is not None:
        shown = f"libvirt {version[0]}.{version[1]}"
        if version >= QEMU_D_SINCE:
            out.append(Check("libvirt", OK, f"{shown}: hooks/qemu.d/ supported (other hooks keep working)"))
        else:
            out.append(
                Check(
                    "libvirt",
                    WARN,
                    f"{shown} predates hooks/qemu.d/ (6.5): hostguard must own hooks/qemu",
                    "upgrade libvirt to 6.5 or later",
                )
            )
    running = [(view.comm(pid), pid) for pid in view.pids() if view.comm(pid) in LIBVIRT_DAEMONS]
    if not running:
        out.append(
            Check("libvirt daemon", FAIL, "neither libvirtd nor virtqemud is running", "systemctl start libvirtd")
        )
        return out, version, None
    name, pid = sorted(running)[0]
    out.append(Check("libvirt daemon", OK, f"{name} running (pid {pid})"))
    return out, version, (name, pid)


def _executable_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode) and os.access(path, os.X_OK)
    except OSError:
        return False


def _changed_at(path: Path) -> float:
    st = path.stat()
    return max(st.st_mtime, st.st_ctime)  # ctime: any rename/chmod/write; mtime: in case it was set ahead


def hook_path(view: HostView, version: tuple[int, int] | None) -> Path:
    if version is not None and version < QEMU_D_SINCE:
        return view.hooks_dir / "qemu"
    return view.hooks_dir / "qemu.d" / HOOK_NAME


def pinned_config(hook: Path) -> Path | None:
    """The hostguard.toml an installed hook pins (`hook install --config`), if any."""
    try:
        text = hook.read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"^os\.environ\['HOSTGUARD_CONFIG'\] = '([^']+)'$", text, re.MULTILINE)
    return Path(found.group(1)) if found else None


def check_hook(view: HostView, version: tuple[int, int] | None, daemon: tuple[str, int] | None) -> list[Check]:
    hook = hook_path(view, version)
    install = "hostguard hook install --restart-libvirtd"
    try:
        content = hook.read_bytes()
    except FileNotFoundError:
        return [Check("hook", FAIL, f"{hook} is not installed: no start is verified", install)]
    except OSError as exc:
        return [Check("hook", FAIL, f"cannot read {hook}: {exc.strerror}", install)]
    if HOOK_MARKER not in content:
        return [Check("hook", FAIL, f"{hook} is not hostguard's hook shim", install)]
    if not _executable_file(hook):
        return [Check("hook", FAIL, f"{hook} is not an executable regular file: libvirtd skips it", install)]
    # The kernel splits a shebang at the first blank: the interpreter, then one argument (the hook's `-IS`).
    interpreter = (content.split(b"\n", 1)[0][2:].decode(errors="replace").split() or [""])[0]
    if not interpreter.startswith("/") or not _executable_file(Path(interpreter)):
        return [
            Check(
                "hook",
                FAIL,
                f"{hook} runs {interpreter!r}, which is missing: every start would fail",
                f"reinstall the hook with the current hostguard: {install}",
            )
        ]
    pinned = pinned_config(hook)
    uses = f"config {pinned}" if pinned else "config from HOSTGUARD_CONFIG or the default"
    out = [Check("hook", OK, f"{hook} installed (python {interpreter}, {uses})")]
    if daemon is None:
        return out
    name, pid = daemon
    started = view.start_time(pid)
    if started is None:
        out.append(Check("hook active", WARN, f"cannot read the start time of {name} (pid {pid})"))
        return out
    restart = f"systemctl restart {name} (running guests keep running), or {install}"
    if _changed_at(hook) < started:
        out.append(Check("hook active", OK, f"{name} started after the hook was installed: it runs the hook"))
        return out
    # Installed after the daemon started: it runs only if libvirtd already had a qemu hook when it started.
    older = [
        p
        for p in (view.hooks_dir / "qemu", *sorted((view.hooks_dir / "qemu.d").glob("*")))
        if p != hook and _executable_file(p) and _changed_at(p) < started
    ]
    if older:
        out.append(
            Check(
                "hook active",
                OK,
                f"the hook changed after {name} started, but {older[0]} was there before: {name} rescans qemu.d/",
            )
        )
    else:
        out.append(
            Check(
                "hook active",
                FAIL,
                f"the hook was installed after {name} started (pid {pid}): {name} does not run it yet",
                restart,
            )
        )
    return out


def check_config(path: Path) -> tuple[list[Check], Any]:

    try:
        config = load_config(path)
        config.finding_policy()
    except HostguardError as exc:
        return [Check("configuration", FAIL, str(exc), f"fix {path} (docs/admin-guide.md)")], None
    out = [Check("configuration", OK, f"{path} is valid")]
    if config.mode == "audit":
        out.append(
            Check(
                "mode",
                WARN,
                "audit mode: nothing is denied, refusals are only logged as would-deny",
                f'when the audit log shows no unexpected would-deny, set [policy] mode = "enforce" in {path}',
            )
        )
    else:
        out.append(Check("mode", OK, "enforce: unverified starts are denied"))
    return out, config


def check_trust(trust_dir: Path, now: float) -> list[Check]:

    try:
        store, policy = read_trust_dir(trust_dir).load()
    except HostguardError as exc:
        return [Check("trust store", FAIL, str(exc), f"fix {trust_dir}: every start in scope is denied until then")]
    out = [
        Check(
            "trust store",
            OK,
            f"{trust_dir}: {len(store.roots)} root(s), {len(store.intermediates)} intermediate(s), "
            f"signer policy with {len(policy.grants)} grant(s)",
        )
    ]
    if not store.crls:
        required = bool(policy.require_crl)
        out.append(
            Check(
                "CRLs",
                FAIL if "*" in policy.require_crl else WARN,
                "no CRLs in crls/: "
                + (
                    "signers.toml requires them, matching starts are denied"
                    if required
                    else "revocation is not checked"
                ),
                f"install your CAs' CRLs into {trust_dir / 'crls'}",
            )
        )
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    for crl in store.crls:
        issuer = crl.issuer.rfc4514_string()
        nxt = crl.next_update_utc
        if nxt is None or nxt <= at:
            out.append(
                Check(
                    "CRL",
                    FAIL,
                    f"CRL from {issuer!r} is stale (next update {nxt.isoformat() if nxt else 'unset'}): "
                    "starts signed under it are denied",
                    "install a fresh CRL",
                )
            )
            continue
        days = (nxt - at).total_seconds() / 86400
        status = WARN if days < CRL_WARN_DAYS else OK
        out.append(
            Check(
                "CRL",
                status,
                f"CRL from {issuer!r} is stale in {days:.1f} days ({nxt:%Y-%m-%d %H:%M} UTC)",
                "install a fresh CRL before then" if status == WARN else "",
            )
        )
    return out


def check_daemon(view: HostView, socket_path: Path) -> list[Check]:
    start = "systemctl enable --now hostguardd (or run `hostguard daemon`)"
    if not socket_path.exists():
        return [Check("daemon", FAIL, f"hostguardd is not running (no {socket_path}): no post-start checks", start)]
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(socket_path))  # the daemon ignores an empty message
        except OSError as exc:
            return [Check("daemon", FAIL, f"hostguardd does not answer on {socket_path} ({exc.strerror})", start)]
    pid = view.socket_owner(socket_path)
    shown = f" (pid {pid})" if pid is not None else ""
    out = [Check("daemon", OK, f"hostguardd answers on {socket_path}{shown}")]
    if pid is None:
        out.append(Check("daemon connection", WARN, "cannot tell which process serves the socket"))
    elif pid in view.client_pids():
        out.append(Check("daemon connection", OK, "hostguardd is connected to libvirtd"))
    else:
        out.append(
            Check(
                "daemon connection",
                FAIL,
                f"hostguardd (pid {pid}) is not connected to libvirtd: it sees no starts",
                "check its log (journalctl -u hostguardd); it reconnects by itself once libvirtd answers",
            )
        )
    return out


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_directory(name: str, path: Path, *, private: bool, owner: int = 0) -> list[Check]:
    """Root-owned, never writable by group or others; `private` ones (state) not readable by others either."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return [Check(name, WARN, f"{path} does not exist yet: created at the first start", "")]
    except OSError as exc:
        return [Check(name, FAIL, f"cannot stat {path}: {exc.strerror}")]
    mode = stat.S_IMODE(st.st_mode)
    fix = f"chown root:root {path} && chmod {'0700' if private else '0750'} {path}"
    if not stat.S_ISDIR(st.st_mode):
        return [Check(name, FAIL, f"{path} is not a directory")]
    if st.st_uid != owner:
        return [
            Check(
                name, FAIL, f"{path} is owned by uid {st.st_uid}, not root: it could rewrite hostguard's records", fix
            )
        ]
    if mode & 0o022:
        return [Check(name, FAIL, f"{path} is writable by group or others (mode {mode:04o})", fix)]
    if private and mode & 0o007:
        return [Check(name, WARN, f"{path} is readable by others (mode {mode:04o})", fix)]
    return [Check(name, OK, f"{path}: root, mode {mode:04o}")]


def check_audit_log(path: Path, *, owner: int = 0) -> list[Check]:
    out = check_directory("audit directory", path.parent, private=False, owner=owner)
    try:
        st = path.stat()
    except OSError:
        return out
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != owner or mode & 0o022:
        out.append(
            Check(
                "audit log",
                FAIL,
                f"{path}: uid {st.st_uid}, mode {mode:04o}: others could rewrite it",
                f"chown root:root {path} && chmod 0640 {path}",
            )
        )
    elif mode & 0o004:
        out.append(Check("audit log", WARN, f"{path} is world-readable (mode {mode:04o})", f"chmod 0640 {path}"))
    else:
        out.append(Check("audit log", OK, f"{path}: root, mode {mode:04o}"))
    return out


def check_space(state_dir: Path) -> list[Check]:
    where = _nearest_existing(state_dir)
    try:
        vfs = os.statvfs(where)
    except OSError as exc:
        return [Check("free space", FAIL, f"cannot statvfs {where}: {exc.strerror}")]
    free = vfs.f_bavail * vfs.f_frsize
    shown = f"{free / (1 << 30):.1f} GiB free for {state_dir}"
    if free < SPACE_FAIL:
        return [
            Check("free space", FAIL, f"{shown}: the state database and caches cannot grow", f"free space on {where}")
        ]
    if free < SPACE_WARN:
        return [Check("free space", WARN, shown, f"free space on {where} (memory checks need room for work files)")]
    return [Check("free space", OK, shown)]


def check_domains(view: HostView, config: Any) -> list[Check]:
    try:
        conn = view.connect()
        domains = sorted(conn.listAllDomains(0), key=lambda d: d.name())
    except (HostguardError, libvirt.libvirtError) as exc:
        return [Check("domains", FAIL, f"cannot list domains: {exc}", "start libvirtd")]
    out = []
    for dom in domains:
        name = dom.name()
        glob = config.exemption_for(name)
        if glob is not None:
            out.append(
                Check("domain", WARN, f"{name}: exempt by {glob!r}: never verified", "remove the exemption when done")
            )
            continue
        if not config.memory_check:
            continue
        try:
            spec = parse_domain_xml(
                str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0)).encode()
            )
        except (HostguardError, libvirt.libvirtError) as exc:
            out.append(Check("domain", WARN, f"{name}: cannot read its definition: {exc}"))
            continue
        if not spec.vmcoreinfo:
            out.append(
                Check(
                    "domain",
                    WARN,
                    f"{name}: no <vmcoreinfo/>: the memory check falls back to a weaker kernel lookup",
                    f"hostguard domain check-config {name} --fix",
                )
            )
    ready = len(domains) - len(out)
    out.insert(0, Check("domains", OK, f"{len(domains)} domain(s), {ready} ready"))
    return out


def run_checks(view: HostView, config_path: Path | None) -> tuple[list[Check], bool]:
    """Every check in order; the bool says whether the configuration loaded."""

    checks, version, daemon = check_libvirt(view)
    checks += check_hook(view, version, daemon)
    path = config_path or pinned_config(hook_path(view, version)) or default_config_path()
    config_checks, config = check_config(path)
    checks += config_checks
    if config is None:
        return checks, False
    checks += check_trust(config.trust_dir, view.now)
    checks += check_daemon(view, config.daemon_socket)
    checks += check_directory("state directory", config.state_dir, private=True)
    checks += check_audit_log(config.audit_log)
    checks += check_space(config.state_dir)
    if daemon is not None:
        checks += check_domains(view, config)
    return checks, True
