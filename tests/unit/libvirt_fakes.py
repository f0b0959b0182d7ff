"""A fake of hostguard.host.libvirt.Domain for unit tests: every method of the protocol, each call recorded."""

from __future__ import annotations

import time
import uuid as uuidlib
from typing import Any

from hostguard.host import libvirt
from hostguard.record import Record, field


class FakeDomain(Record, frozen=False):
    run_state: int = libvirt.VIR_DOMAIN_RUNNING
    fail_suspend: bool = False
    calls: list[str] = field(default_factory=list)
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    delay: float = 0.0
    domain_name: str = "fake"
    xml: str = "<domain/>"
    persistent: bool = True
    metadata: list[tuple[int, str, str, str, int]] = field(default_factory=list)
    gone: bool = False  # stopped meanwhile: persistent, still defined, inactive
    disconnected: bool = False  # libvirtd went away (a keepalive timeout, a restart): its connection is dead
    killed_under_suspend: bool = False  # libvirtd killed during suspend(): QEMU paused, the answer lost, calls fail

    def name(self) -> str:
        return self.domain_name

    def UUIDString(self) -> str:
        return self.uuid

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def info(self) -> list[int]:
        return [self.run_state, 0, 0, 1, 0]

    def state(self, flags: int = 0) -> list[int]:
        if self.killed_under_suspend and self.disconnected:
            raise libvirt.libvirtError("Cannot write data: Broken pipe")
        paused_by_suspend = self.run_state == libvirt.VIR_DOMAIN_PAUSED and "suspend" in self.calls
        return [self.run_state, libvirt.VIR_DOMAIN_PAUSED_USER if paused_by_suspend else 0]

    def ID(self) -> int:
        return -1 if self.gone else 7

    def isActive(self) -> int:
        return int(not self.gone and self.run_state != libvirt.VIR_DOMAIN_SHUTOFF)

    def isPersistent(self) -> int:
        return int(self.persistent)

    def suspend(self) -> int:
        self.calls.append("suspend")
        if self.fail_suspend:
            raise libvirt.libvirtError("injected: cannot suspend")
        if self.killed_under_suspend:
            self.run_state, self.disconnected = libvirt.VIR_DOMAIN_PAUSED, True
            raise libvirt.libvirtError("End of file while reading data: Input/output error")
        time.sleep(self.delay)
        self.run_state = libvirt.VIR_DOMAIN_PAUSED
        return 0

    def resume(self) -> int:
        self.calls.append("resume")
        self.run_state = libvirt.VIR_DOMAIN_RUNNING
        return 0

    def destroy(self) -> int:
        self.calls.append("destroy")
        self.run_state = libvirt.VIR_DOMAIN_SHUTOFF
        return 0

    def createWithFlags(self, flags: int = 0) -> int:
        self.calls.append(f"create:{flags}")
        self.run_state = libvirt.VIR_DOMAIN_PAUSED if flags & libvirt.VIR_DOMAIN_START_PAUSED else 1
        return 0

    def setMetadata(self, type: int, metadata: str, key: str, uri: str, flags: int = 0) -> int:
        self.metadata.append((type, metadata, key, uri, flags))
        return 0

    def coreDumpWithFormat(self, to: str, dumpformat: int, flags: int = 0) -> int:
        raise libvirt.libvirtError("the fake domain has no memory to dump")

    def connect(self) -> Any:
        return FakeConnection(self)


class FakeConnection:
    """The connection of one fake domain: looking it up again finds it (or, once it is gone, its stopped self)."""

    def __init__(self, domain: FakeDomain) -> None:
        self.domain = domain

    def isAlive(self) -> int:
        return int(not self.domain.disconnected)

    def lookupByUUIDString(self, uuidstr: str) -> FakeDomain:
        if uuidstr != self.domain.uuid:
            raise libvirt.libvirtError(f"no domain with UUID {uuidstr}")
        return self.domain


VIR_ERR_SYSTEM_ERROR = 38  # what a call on a connection libvirtd dropped raises ("client socket is closed")


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, 0, message, 0, "", None, None, 0, 0)
    return err


class FakeHost:
    """A connection to a libvirtd that knows these domains: others are VIR_ERR_NO_DOMAIN, as libvirt says it;
    with `down` every call fails as on a dead connection."""

    def __init__(self, *domains: FakeDomain) -> None:
        self.doms = {d.uuid: d for d in domains}
        self.down = False
        self.lookups: list[str] = []

    def isAlive(self) -> int:
        return int(not self.down)

    def lookupByUUIDString(self, uuidstr: str) -> FakeDomain:
        self.lookups.append(uuidstr)
        if self.down:
            raise libvirt_error(VIR_ERR_SYSTEM_ERROR, "internal error: client socket is closed")
        if uuidstr not in self.doms:
            raise libvirt_error(
                libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with matching uuid '{uuidstr}'"
            )
        return self.doms[uuidstr]
