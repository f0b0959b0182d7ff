"""The one libvirt adapter, for the daemon and the CLI: the only module that imports libvirt's Python binding.

Everything else talks to libvirt through what this module exports: the `Domain` and `Connection` protocols (the
part of libvirt's `virDomain` and `virConnect` that hostguard uses; unit tests pass fakes of them), the
constants and `libvirtError` under their libvirt names (so code reads like libvirt's own documentation), and
helpers for connections, the event loop, QEMU process facts and verdict metadata.

Never used by the hook: a hook that calls the libvirt API deadlocks libvirtd (an import contract checks that
preboot/ and hook.py cannot reach this module).
"""

from __future__ import annotations

import os
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
    VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
    VIR_DOMAIN_EVENT_ID_LIFECYCLE,
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

__all__ = [
    "QEMU_RUN_DIR",
    "URI",
    "VIR_CONNECT_LIST_DOMAINS_ACTIVE",
    "VIR_DOMAIN_AFFECT_CONFIG",
    "VIR_DOMAIN_AFFECT_LIVE",
    "VIR_DOMAIN_CORE_DUMP_FORMAT_RAW",
    "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED",
    "VIR_DOMAIN_EVENT_ID_LIFECYCLE",
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
    "Connection",
    "Domain",
    "connection_lost",
    "event_loop_age",
    "libvirtError",
    "lookup",
    "open_connection",
    "open_file_identities",
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
