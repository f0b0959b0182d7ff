"""Helpers for the owner key-exchange unit tests: in-memory VMs, owners and attackers over socket pairs."""

from __future__ import annotations

import datetime as dt
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostguard.owner import session
from hostguard.owner.protocol import Payload
from hostguard.owner.tlschannel import generate_key
from hostguard.owner.tokens import Secret, public_key_hash

NOW = dt.datetime.now(dt.UTC)  # OpenSSL checks certificate validity against the real clock


@dataclass
class RecordingHandler:
    pairings: list[tuple[str, str]] = field(default_factory=list)
    payloads: list[Payload] = field(default_factory=list)

    def paired(self, owner_key: str, protocol: str) -> None:
        self.pairings.append((owner_key, protocol))

    def apply(self, payload: Payload) -> list[dict[str, Any]]:
        self.payloads.append(payload)
        return [{"item": "script", "name": s.name, "exit": 0} for s in payload.scripts]


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, Outcome]:
    out = Outcome()

    def run() -> None:
        try:
            out.value = fn()
        except BaseException as exc:  # the test inspects whatever happened
            out.error = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(10)
    return a, b


@dataclass
class Vm:
    """A VM end (the real `vm_session`) with its state and handler."""

    state: session.VmState
    handler: RecordingHandler = field(default_factory=RecordingHandler)

    @classmethod
    def shared_secret(cls, secret: Secret) -> Vm:
        return cls(session.VmState(key=generate_key(), protocol="shared-secret", secret=secret))

    @classmethod
    def no_secrets(cls, owner_pin: str) -> Vm:
        return cls(session.VmState(key=generate_key(), protocol="no-secrets", owner_pin=owner_pin))

    @property
    def key_hash(self) -> str:
        return self.state.vm_key

    def serve(self, sock: socket.socket) -> session.VmOutcome:
        with sock:
            return session.vm_session(sock, self.state, self.handler, now=NOW)


def run_session(
    vm: Vm,
    owner_key: Any,
    *,
    secret: Secret | None = None,
    vm_pin: str | None = None,
    payload: Payload | None = None,
) -> tuple[Outcome, Outcome]:
    """(vm outcome, owner outcome) of one session over a socket pair."""
    a, b = pair()
    t, vm_out = in_thread(lambda: vm.serve(a))
    owner_out = Outcome()
    try:
        with b:
            owner_out.value = session.owner_session(
                b, owner_key, secret=secret, vm_pin=vm_pin, payload=payload, now=NOW
            )
    except BaseException as exc:
        owner_out.error = exc
    t.join(15)
    return vm_out, owner_out


def owner_hash(key: Any) -> str:
    return public_key_hash(key.public_key())


class TerminatingRelay:
    """An attacker on the path that terminates TLS on both sides: it plays the VM toward the owner and the
    owner toward the VM, with its own keys (and, lacking K, a K of its own)."""

    def __init__(self, vm: Vm, *, owner_pin_for_vm_side: str | None = None) -> None:
        self.vm = vm
        self.key = generate_key()
        self.fake_secret = Secret.generate()
        protocol = vm.state.protocol
        self.face = Vm(
            session.VmState(
                key=self.key,
                protocol=protocol,
                secret=Secret.parse(self.fake_secret.encode()) if protocol == "shared-secret" else None,
                owner_pin=owner_pin_for_vm_side,
            )
        )
        self.upstream = Outcome()
        self.vm_side = Outcome()

    def run(self, owner_sock: socket.socket) -> None:
        """Serve the owner as the fake VM, then talk to the real VM as the fake owner."""
        t, self.vm_side = in_thread(lambda: self.face.serve(owner_sock))
        t.join(15)
        a, b = pair()
        tv, real = in_thread(lambda: self.vm.serve(a))
        try:
            with b:
                self.upstream.value = session.owner_session(
                    b,
                    self.key,
                    secret=self.fake_secret if self.vm.state.protocol == "shared-secret" else None,
                    vm_pin=None if self.vm.state.protocol == "shared-secret" else self.vm.key_hash,
                    now=NOW,
                )
        except BaseException as exc:
            self.upstream.error = exc
        tv.join(15)
        self.real_vm = real
