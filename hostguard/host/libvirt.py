"""The one libvirt adapter, for the daemon and the CLI: the only module that imports libvirt's Python binding.

Everything else talks to libvirt through what this module exports: the `Domain` and `Connection` protocols (the
part of libvirt's `virDomain` and `virConnect` that hostguard uses; unit tests pass fakes of them), the
constants and `libvirtError` under their libvirt names (so code reads like libvirt's own documentation), and
helpers for connections, the event loop, QEMU process facts and verdict metadata.

Never used by the hook: a hook that calls the libvirt API deadlocks libvirtd (an import contract checks that
preboot/ and hook.py cannot reach this module).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import libvirt
from libvirt import (
    VIR_CONNECT_LIST_DOMAINS_ACTIVE,
    VIR_DOMAIN_AFFECT_CONFIG,
    VIR_DOMAIN_AFFECT_LIVE,
    VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
    VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
    VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
    VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
    VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    VIR_DOMAIN_EVENT_ID_TRAY_CHANGE,
    VIR_DOMAIN_EVENT_RESUMED,
    VIR_DOMAIN_EVENT_RESUMED_MIGRATED,
    VIR_DOMAIN_EVENT_STARTED,
    VIR_DOMAIN_EVENT_STOPPED,
    VIR_DOMAIN_EVENT_UNDEFINED,
    VIR_DOMAIN_METADATA_ELEMENT,
    VIR_DOMAIN_PAUSED,
    VIR_DOMAIN_PAUSED_STARTING_UP,
    VIR_DOMAIN_PAUSED_USER,
    VIR_DOMAIN_RUNNING,
    VIR_DOMAIN_SHUTOFF,
    VIR_DOMAIN_START_PAUSED,
    VIR_DOMAIN_XML_INACTIVE,
    VIR_DOMAIN_XML_SECURE,
    VIR_DUMP_MEMORY_ONLY,
    VIR_ERR_NO_DOMAIN,
    libvirtError,
)

from hostguard.errors import ConfigError
from hostguard.record import Record

__all__ = [
    "QEMU_RUN_DIR",
    "URI",
    "VIR_CONNECT_LIST_DOMAINS_ACTIVE",
    "VIR_DOMAIN_AFFECT_CONFIG",
    "VIR_DOMAIN_AFFECT_LIVE",
    "VIR_DOMAIN_CORE_DUMP_FORMAT_RAW",
    "VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2",
    "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED",
    "VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED",
    "VIR_DOMAIN_EVENT_ID_LIFECYCLE",
    "VIR_DOMAIN_EVENT_ID_TRAY_CHANGE",
    "VIR_DOMAIN_EVENT_RESUMED",
    "VIR_DOMAIN_EVENT_RESUMED_MIGRATED",
    "VIR_DOMAIN_EVENT_STARTED",
    "VIR_DOMAIN_EVENT_STOPPED",
    "VIR_DOMAIN_EVENT_UNDEFINED",
    "VIR_DOMAIN_METADATA_ELEMENT",
    "VIR_DOMAIN_PAUSED",
    "VIR_DOMAIN_PAUSED_STARTING_UP",
    "VIR_DOMAIN_PAUSED_USER",
    "VIR_DOMAIN_RUNNING",
    "VIR_DOMAIN_SHUTOFF",
    "VIR_DOMAIN_START_PAUSED",
    "VIR_DOMAIN_XML_INACTIVE",
    "VIR_DOMAIN_XML_SECURE",
    "VIR_DUMP_MEMORY_ONLY",
    "VIR_ERR_NO_DOMAIN",
    "BlockNode",
    "Connection",
    "Domain",
    "OpenFile",
    "connection_lost",
    "event_loop_age",
    "libvirtError",
    "lookup",
    "open_connection",
    "open_file_identities",
    "open_files",
    "qemu_block_nodes",
    "qemu_pid",
    "set_verdict_metadata",
    "start_event_loop",
]

URI = "qemu:///system"
QEMU_RUN_DIR = Path("/run/libvirt/qemu")


class Domain(Protocol):
    """The part of libvirt's `virDomain` that hostguard uses."""

    def name(self) -> str: ...

    def UUIDString(self) -> str: ...

    def ID(self) -> int: ...

    def XMLDesc(self, flags: int = 0) -> str: ...

    def info(self) -> list[int]: ...

    def state(self, flags: int = 0) -> list[int]: ...

    def isActive(self) -> int: ...

    def isPersistent(self) -> int: ...

    def suspend(self) -> int: ...

    def resume(self) -> int: ...

    def destroy(self) -> int: ...

    def createWithFlags(self, flags: int = 0) -> int: ...

    def setMetadata(self, type: int, metadata: str, key: str, uri: str, flags: int = 0) -> int: ...

    def coreDumpWithFormat(self, to: str, dumpformat: int, flags: int = 0) -> int: ...

    def connect(self) -> Connection: ...


class Connection(Protocol):
    """The part of libvirt's `virConnect` that hostguard uses."""

    def close(self) -> int: ...

    def lookupByName(self, name: str) -> Domain: ...

    def lookupByUUIDString(self, uuidstr: str) -> Domain: ...

    def listAllDomains(self, flags: int = 0) -> list[Domain]: ...

    def defineXML(self, xml: str) -> Domain: ...

    def storagePoolLookupByName(self, name: str) -> Any: ...

    def storagePoolDefineXML(self, xmlDesc: str, flags: int = 0) -> Any: ...

    def registerCloseCallback(self, cb: Callable[..., None], opaque: Any) -> int: ...

    def domainEventRegisterAny(self, dom: Domain | None, eventID: int, cb: Callable[..., Any], opaque: Any) -> int: ...

    def setKeepAlive(self, interval: int, count: int) -> int: ...

    def isAlive(self) -> int: ...


def connection_lost(conn: Connection | None) -> bool:
    """Is this connection to libvirtd gone (closed after a keepalive timeout, libvirtd restarted or killed)?"""
    if conn is None:
        return True
    try:
        return not conn.isAlive()
    except libvirtError:
        return True


def suspend_did_not_happen(dom: Domain) -> bool:
    """After dom.suspend() raised: does the domain read as not paused? Unknown (its state unreadable) is False: a
    libvirtd killed under the call may have paused QEMU before the answer was lost, and a marker removed then
    would leave the guest paused by no one (a CI run found one)."""
    try:
        return bool(dom.state()[0] != VIR_DOMAIN_PAUSED)
    except libvirtError:
        return False


_loop_lock = threading.Lock()
_loop_threads: list[threading.Thread] = []  # at most one: the process-wide libvirt event loop


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once per process).
    Must happen before the connection that registers callbacks is opened."""
    with _loop_lock:
        if _loop_threads:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        thread.start()
        _loop_threads.append(thread)


def open_connection(uri: str = URI) -> Connection:
    try:
        conn: Connection = libvirt.open(uri)
    except libvirtError as exc:
        raise ConfigError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from None
    return conn


def lookup(conn: Connection, name_or_uuid: str) -> Domain:
    try:
        if len(name_or_uuid) == 36 and name_or_uuid.count("-") == 4:
            return conn.lookupByUUIDString(name_or_uuid)
        return conn.lookupByName(name_or_uuid)
    except libvirtError:
        raise ConfigError(f"no domain {name_or_uuid!r}") from None


def qemu_pid(domain_name: str) -> int | None:
    try:
        return int((QEMU_RUN_DIR / f"{domain_name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def open_file_identities(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file the process has open."""
    found: set[tuple[int, int]] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            st = os.stat(entry)
        except OSError:
            continue  # closed meanwhile
        found.add((st.st_dev, st.st_ino))
    return found


class OpenFile(Record):
    """A regular file or block device a process holds open: the name the kernel shows for the descriptor (the
    file's current path, `... (deleted)` when unlinked) and the identity of what is open."""

    fd: int
    path: str
    dev: int
    ino: int
    readable: bool = True  # opened for reading (O_RDONLY or O_RDWR): a write-only descriptor feeds nothing in


def _readable(pid: int, fd: str) -> bool:
    """Whether the descriptor's access mode allows reading (/proc/PID/fdinfo/FD `flags`, octal); True when in
    doubt, so that a file whose mode cannot be read is judged like a readable one."""
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE != os.O_WRONLY
    except (OSError, ValueError, IndexError):
        pass
    return True


def open_files(pid: int) -> tuple[OpenFile, ...]:
    """Every regular file and block device the process has open (sockets, pipes, devices, anon inodes left out).
    Raises ConfigError when the process's descriptors cannot be listed (it is gone, or /proc is not ours)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = sorted(fd_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    except OSError as exc:
        raise ConfigError(f"cannot list the open files of process {pid}: {exc.strerror}") from None
    found = []
    for entry in entries:
        try:
            target = os.readlink(entry)
            st = os.stat(entry)
        except OSError:
            continue  # closed meanwhile
        if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            found.append(OpenFile(int(entry.name), target, st.st_dev, st.st_ino, _readable(pid, entry.name)))
    return tuple(found)


class BlockNode(Record):
    """One node of QEMU's block graph (`query-named-block-nodes`): its node name, its driver (`file`,
    `host_device`, `qcow2`, `raw`, `nbd`, a filter such as `mirror_top`, ...) and the file name QEMU reports
    for it (a host path for the file drivers, a URL or `json:{...}` for others)."""

    name: str
    driver: str
    filename: str
    read_only: bool


def qemu_block_nodes(dom: Domain) -> tuple[BlockNode, ...]:
    """Every node of the running domain's block graph, as QEMU has it now (not as libvirt's XML says): nodes of
    block jobs, media, and nodes added behind libvirt's back with `blockdev-add` included. Read-only QMP; libvirt
    marks the domain "tainted: custom-monitor" once per run. ConfigError when QEMU cannot be asked or answers
    something that is not the documented shape."""
    import libvirt_qemu  # lazy: only the block-graph stage needs the QEMU-specific binding

    command = json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    try:
        reply = str(libvirt_qemu.qemuMonitorCommand(dom, command, 0))
    except libvirtError as exc:
        raise ConfigError(f"QEMU monitor of {dom.name()}: {exc.get_error_message()}") from None
    return parse_block_nodes(reply)


def parse_block_nodes(reply: str) -> tuple[BlockNode, ...]:
    """The nodes of a `query-named-block-nodes` reply; ConfigError for anything but the documented shape."""
    try:
        nodes = json.loads(reply)["return"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError("QEMU's query-named-block-nodes reply is not a QMP return value") from None
    if not isinstance(nodes, list):
        raise ConfigError("QEMU's query-named-block-nodes reply is not a list")
    out = []
    for node in nodes:
        if not isinstance(node, dict):
            raise ConfigError("QEMU's query-named-block-nodes reply lists a non-object")
        name, driver, filename, ro = node.get("node-name", ""), node.get("drv"), node.get("file"), node.get("ro")
        if not (isinstance(name, str) and isinstance(driver, str) and isinstance(filename, str)):
            raise ConfigError("QEMU's query-named-block-nodes reply lists a node without drv/file strings")
        out.append(BlockNode(name, driver, filename, ro is True))
    return tuple(out)


def set_verdict_metadata(dom: Domain, xml: str, namespace: str, prefix: str) -> None:
    """Keep the verdict where `virsh metadata` shows it: live, and in the persistent config too."""
    flags = VIR_DOMAIN_AFFECT_LIVE
    if dom.isPersistent():
        flags |= VIR_DOMAIN_AFFECT_CONFIG
    dom.setMetadata(VIR_DOMAIN_METADATA_ELEMENT, xml, prefix, namespace, flags)


def qemu_monitor_hmp(dom: Domain, command: str) -> str:
    """Run a read-only HMP `command` ("info ...") on the domain's QEMU through libvirt's monitor passthrough.
    libvirt marks the domain "tainted: custom-monitor" in its log once per run; nothing changes in QEMU."""
    import libvirt_qemu  # lazy: only the memory check needs the QEMU-specific binding

    if not command.startswith("info "):
        raise ValueError("only 'info' commands are allowed")
    try:
        return str(libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))
    except libvirtError as exc:
        raise ConfigError(f"QEMU monitor of {dom.name()}: {exc.get_error_message()}") from None


def event_loop_age(period: float) -> Callable[[], float]:
    """A timer in libvirt's event loop stamps a heartbeat every `period` s; returns "seconds since the last one".
    The loop must be registered (start_event_loop) before: the systemd watchdog pings only while it runs."""

    import libvirt

    last = [time.monotonic()]
    lock = threading.Lock()

    def tick(_timer: int, _opaque: object) -> None:
        with lock:
            last[0] = time.monotonic()

    libvirt.virEventAddTimeout(max(1, int(period * 1000)), tick, None)

    def age() -> float:
        with lock:
            return time.monotonic() - last[0]

    return age
