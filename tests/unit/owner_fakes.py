"""Helpers for the owner key-exchange unit tests: in-memory VMs, owners and attackers over socket pairs."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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


# --- relays that cut, stall, delay or record the exchange ------------------------------------------------------

O2V, V2O = "owner->vm", "vm->owner"


@dataclass(frozen=True)
class Cut:
    """Forward the first `keep` units a side sends in `direction`, then:

    * ``close``: hang up at once (both ends see EOF right after that unit);
    * ``hangup``: hang up when the next unit of `direction` comes (the other way flows until then);
    * ``blackhole``: drop that direction silently from there on (the other keeps flowing; both ends run into
      their timeouts);
    * ``hold``: keep that direction's later units back until released (a delay)."""

    direction: str
    keep: int
    mode: str = "hangup"


class UnitCutter:
    """What a relay that holds no key sees: per direction, the cleartext hello line, then whole TLS records
    (5-byte header + length). It counts and records them and applies a `Cut` (none: an honest relay, whose
    counts give the boundaries to sweep)."""

    def __init__(self, cut: Cut | None = None) -> None:
        self.cut = cut
        self.counts = {O2V: 0, V2O: 0}
        self.units: dict[str, list[bytes]] = {O2V: [], V2O: []}
        self.pending = {O2V: bytearray(), V2O: bytearray()}
        self.held: list[bytes] = []
        self.hung_up = False

    def feed(self, direction: str, data: bytes) -> list[bytes]:
        """The units of `direction` to forward now (complete ones only); sets `hung_up` on a hangup cut."""
        out: list[bytes] = []
        buf = self.pending[direction]
        buf += data
        while not self.hung_up and (size := self._unit_size(direction, buf)) is not None:
            unit = bytes(buf[:size])
            del buf[:size]
            index = self.counts[direction]
            self.counts[direction] += 1
            self.units[direction].append(unit)
            cut = self.cut
            if cut is None or direction != cut.direction or index < cut.keep:
                out.append(unit)
                if cut is not None and cut.mode == "close" and direction == cut.direction and index + 1 == cut.keep:
                    self.hung_up = True
            elif cut.mode in ("hangup", "close"):
                self.hung_up = True
            elif cut.mode == "hold":
                self.held.append(unit)
        return out

    def _unit_size(self, direction: str, buf: bytearray) -> int | None:
        if self.counts[direction] == 0:  # the hello line
            end = buf.find(b"\n")
            return None if end < 0 else end + 1
        if len(buf) < 5:
            return None
        size = 5 + int.from_bytes(buf[3:5], "big")
        return size if len(buf) >= size else None

    def release(self) -> list[bytes]:
        held, self.held = self.held, []
        return held


class _Pipe:
    """One direction of an in-memory connection: EOF once closed, TimeoutError after `timeout` without data."""

    def __init__(self, timeout: float) -> None:
        self.buf = bytearray()
        self.closed = False
        self.timeout = timeout
        self.cond = threading.Condition()

    def put(self, data: bytes) -> None:
        with self.cond:
            if not self.closed:
                self.buf += data
                self.cond.notify_all()

    def get(self, n: int) -> bytes:
        with self.cond:
            if not self.cond.wait_for(lambda: self.buf or self.closed, self.timeout):
                raise TimeoutError("in-memory stream timed out")
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class MemoryEnd:
    """One end of an in-memory connection: a `Stream` and a context manager (closing = EOF for the peer)."""

    def __init__(self, relay: CuttingRelay, direction: str, inbound: _Pipe) -> None:
        self.relay = relay
        self.direction = direction  # of what this end sends
        self.inbound = inbound

    def recv(self, n: int, /) -> bytes:
        return self.inbound.get(n)

    def sendall(self, data: bytes, /) -> None:
        self.relay.carry(self.direction, data)

    def close(self) -> None:
        self.relay.close_from(self.direction)

    def __enter__(self) -> MemoryEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CuttingRelay:
    """An in-memory connection owner <-> VM through a `UnitCutter`. After a hangup both ends read EOF and
    writes fail (BrokenPipeError). With `vm_port`, the VM's end behaves like the agent's virtio-serial port once
    the host side has gone: writes raise ChannelError("host side of the port disconnected")."""

    def __init__(
        self, cut: Cut | None = None, timeout: float = 10.0, *, vm_timeout: float | None = None, vm_port: bool = False
    ) -> None:
        self.cutter = UnitCutter(cut)
        self.pipes = {O2V: _Pipe(vm_timeout or timeout), V2O: _Pipe(timeout)}  # keyed by the direction carried
        self.owner = MemoryEnd(self, O2V, self.pipes[V2O])
        self.vm = MemoryEnd(self, V2O, self.pipes[O2V])
        self.vm_port = vm_port
        self.closed_from: set[str] = set()
        self.lock = threading.Lock()

    @property
    def counts(self) -> dict[str, int]:
        return self.cutter.counts

    def carry(self, direction: str, data: bytes) -> None:
        from hostguard.owner.protocol import ChannelError

        with self.lock:
            if self.vm_port and direction == V2O and O2V in self.closed_from:
                raise ChannelError("host side of the port disconnected")
            if self.cutter.hung_up:
                raise BrokenPipeError("the relay hung up")
            for unit in self.cutter.feed(direction, data):
                self.pipes[direction].put(unit)
            if self.cutter.hung_up:
                for pipe in self.pipes.values():
                    pipe.close()

    def release(self) -> None:
        """Deliver what a ``hold`` cut kept back (late: e.g. after the owner gave up), then any EOF."""
        cut = self.cutter.cut
        assert cut is not None
        with self.lock:
            pipe = self.pipes[cut.direction]
            for unit in self.cutter.release():
                pipe.put(unit)
            if cut.direction in self.closed_from:
                pipe.close()

    def close_from(self, direction: str) -> None:
        """The end sending in `direction` closed: its peer sees EOF (after any units held back)."""
        with self.lock:
            self.closed_from.add(direction)
            cut = self.cutter.cut
            if not (cut is not None and cut.mode == "hold" and cut.direction == direction):
                self.pipes[direction].close()


class Net:
    """Owner connections to one `Vm`, each through a fresh `CuttingRelay` (cuts taken in order, then honest
    ones) and served by the real `vm_session` in a thread, one at a time like the agent."""

    def __init__(self, vm: Vm, *cuts: Cut, timeout: float = 10.0, vm_timeout: float | None = None) -> None:
        self.vm = vm
        self.cuts = list(cuts)
        self.timeout = timeout
        self.vm_timeout = vm_timeout
        self.relays: list[CuttingRelay] = []
        self.sessions: list[tuple[threading.Thread, Outcome]] = []

    def open(self) -> MemoryEnd:
        self.join()
        relay = CuttingRelay(self.cuts.pop(0) if self.cuts else None, self.timeout, vm_timeout=self.vm_timeout)
        self.relays.append(relay)
        self.sessions.append(in_thread(lambda: serve_stream(self.vm, relay.vm)))
        return relay.owner

    def join(self) -> None:
        for t, _ in self.sessions:
            t.join(30)
            assert not t.is_alive(), "a VM session hangs"

    @property
    def vm_outcomes(self) -> list[Outcome]:
        return [out for _, out in self.sessions]


def serve_stream(vm: Vm, stream: MemoryEnd) -> session.VmOutcome:
    with stream:
        return session.vm_session(stream, vm.state, vm.handler, now=NOW)


class SocketCutRelay:
    """A `UnitCutter` between a unix socket it listens on (the owner's side) and `upstream` (e.g. a VM's owner
    port), for one connection: a byte-dropping relay on the host, holding no key."""

    def __init__(self, listen: Path, upstream: Path, cut: Cut | None, timeout: float = 120.0) -> None:
        self.cutter = UnitCutter(cut)
        self.listen = listen
        self.upstream = upstream
        self.timeout = timeout
        self.lock = threading.Lock()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.connect(str(self.upstream))
            ends = {O2V: (conn, up), V2O: (up, conn)}
            pumps = [threading.Thread(target=self._pump, args=(d, *ends[d], conn, up), daemon=True) for d in ends]
            for t in pumps:
                t.start()
            for t in pumps:
                t.join(self.timeout)

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket, *both: socket.socket) -> None:
        src.settimeout(self.timeout)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with self.lock:
                if self.cutter.hung_up:
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    for unit in self.cutter.feed(direction, data):
                        dst.sendall(unit)
                except OSError:
                    return
                if self.cutter.hung_up:
                    for s in both:
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        self.thread.join(self.timeout)
        self.server.close()
        self.listen.unlink(missing_ok=True)


def clean_counts(protocol: str, payload: Payload | None = None, owner: Any = None) -> dict[str, int]:
    """Units per direction of a complete first exchange (the boundaries a cut can fall on). The owner's side
    depends only on this host's TLS library, so the counts place cuts on real guests too."""
    owner = owner if owner is not None else generate_key()
    k = Secret.generate()
    vm = Vm.shared_secret(Secret.parse(k.encode())) if protocol == "shared-secret" else Vm.no_secrets(owner_hash(owner))
    relay = CuttingRelay()
    t, vm_out = in_thread(lambda: serve_stream(vm, relay.vm))
    with relay.owner:
        session.owner_session(
            relay.owner,
            owner,
            secret=k if protocol == "shared-secret" else None,
            vm_pin=None if protocol == "shared-secret" else vm.key_hash,
            payload=payload,
            now=NOW,
        )
    t.join(10)
    assert vm_out.error is None, vm_out.error
    return dict(relay.counts)
