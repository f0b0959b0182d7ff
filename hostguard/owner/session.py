"""The two ends of one owner <-> VM session, over any byte stream (see `protocol` for the wire format).

`owner_session` is the owner's side (TLS client). `vm_session` is the VM's side (TLS server); it decides
from `VmState` whom to accept:

* auth ``pinned``: the owner's key hash must equal `VmState.owner_pin` (from an earlier pairing, or from the
  no-secrets boot token) - the owner in turn checks the VM's key hash against its own pin.
* auth ``secret``: the VM must hold an unused K (shared-secret token, not paired yet); both sides then prove
  knowledge of K over the transcript of *this* TLS session, owner first.

Key confirmation (docs/adr/0010-owner-key-confirmation.md): the VM commits - pins the owner, wipes K (or, for a
no-secrets VM, makes its pin permanent) - only when the owner's ``confirm`` arrives, and the owner sends it only
after it verified the VM and handed the VM key to `Progress.on_verified` (the caller keeps it). So however a
relay cuts the session: either the VM has not committed and the owner can run the exchange again with the same
K, or it has, and the owner already holds the right VM key.

Side effects (persisting the pairing, applying a payload) go through `VmHandler`, so this module stays pure.
"""

from __future__ import annotations

import datetime as dt
import hmac
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from hostguard.errors import FormatError, HostguardError, UsageError
from hostguard.owner.protocol import (
    MAX_HELLO,
    OWNER_MAGIC,
    VM_MAGIC,
    AuthenticationError,
    ChannelError,
    OwnerHello,
    Payload,
    VersionError,
    VmHello,
    binding_mac,
    binding_transcript,
    cert_key_hash,
    check_keys_frame,
    keys_frame,
    parse_mac,
    parse_owner_hello,
    parse_vm_hello,
    payload_from_wire,
    refusal_error,
    verify_script,
)
from hostguard.owner.tlschannel import Buffered, Stream, TlsChannel, ephemeral_cert, tls_context
from hostguard.owner.tokens import Secret, new_nonce, public_key_hash
from hostguard.record import Record, field

MAX_APPLIES = 8


# --- the owner's side ---------------------------------------------------------------------------------------------


class Applied(Record):
    digest: str
    results: tuple[dict[str, Any], ...]


class OwnerResult(Record):
    vm_key: str
    owner_key: str
    auth: str  # secret | pinned
    applied: Applied | None
    timings: dict[str, float] = field(default_factory=dict)
    resumed: bool = False  # pinned session after an interrupted K exchange whose confirm the VM had received


class Progress(Record, frozen=False):
    """How far the owner got; the caller keeps it across an exception.

    Once the VM is authenticated (its K mac, or its pinned key in TLS), `on_verified` is called with its key
    *before* the owner's confirm leaves - a caller that persists it there holds the VM key whenever the VM
    may have committed; if it raises, no confirm is sent - and then `vm_key` is set. `confirmed`: the confirm
    was sent. `committed`: the VM's ``ready`` arrived (it pinned us; K is spent)."""

    on_verified: Callable[[str], None] | None = None
    vm_key: str | None = None
    confirmed: bool = False
    committed: bool = False


def owner_session(
    stream: Stream,
    key: Any,
    *,
    secret: Secret | None = None,
    vm_pin: str | None = None,
    payload: Payload | None = None,
    now: dt.datetime,
    clock: Callable[[], float] = time.monotonic,
    progress: Progress | None = None,
) -> OwnerResult:
    """Authenticate the VM behind `stream` and optionally apply `payload`. Raises AuthenticationError when
    the VM is not the pinned one or the channel was tampered with, ChannelError/FormatError otherwise. With
    both `secret` and `vm_pin`, the VM must know K *and* have the pinned key (a retry after a cut session)."""
    if secret is None and vm_pin is None:
        raise UsageError("give the shared secret or the VM's key hash: without either the VM is unauthenticated")
    progress = progress if progress is not None else Progress()
    t0 = clock()
    timings: dict[str, float] = {}
    io = Buffered(stream)
    owner_key = public_key_hash(key.public_key())
    cert = ephemeral_cert(key, "owner", now)
    nonce = new_nonce()
    auth = "secret" if secret is not None else "pinned"
    io.sendall(OwnerHello(auth, cert, nonce).encode())
    hello = parse_vm_hello(io.read_line(VM_MAGIC, MAX_HELLO))
    if not hello.ok:
        raise refusal_error(hello.reason or "malformed", "VM")
    vm_key = cert_key_hash(hello.cert)
    if vm_pin is not None and vm_key != vm_pin:
        raise AuthenticationError(f"VM key {vm_key} is not the pinned {vm_pin}")
    timings["hello"] = clock() - t0
    chan = TlsChannel(
        tls_context(server=False, key=key, cert_der=cert, peer_cert_der=hello.cert), io, server_side=False
    )
    chan.handshake(flush=False)  # our Finished leaves with the first frame
    if chan.peer_cert() != hello.cert:
        raise AuthenticationError("the VM's TLS certificate is not the one it announced")
    if secret is not None:
        transcript = binding_transcript(cert, hello.cert, nonce, hello.nonce)
        chan.send_frame({"type": "bind", "mac": binding_mac(secret, "owner", transcript)})
        theirs = parse_mac(chan.recv_frame(("bind",)))
        if not hmac.compare_digest(theirs, binding_mac(secret, "vm", transcript)):
            raise AuthenticationError("the VM's binding mac is wrong: it does not know K, or a relay terminated TLS")
    # The VM is authenticated (it knows K over this session, or TLS proved its pinned key). Keep its key
    # before confirming: from the confirm on, the VM may commit whatever happens to this session.
    if progress.on_verified is not None:
        progress.on_verified(vm_key)  # raising here aborts before the confirm: the VM commits nothing
    progress.vm_key = vm_key
    chan.send_frame(keys_frame("confirm", vm_key, owner_key))
    progress.confirmed = True
    check_keys_frame(chan.recv_frame(("ready",)), vm_key, owner_key)
    progress.committed = True
    timings["handshake"] = clock() - t0 - timings["hello"]
    applied = None
    if payload is not None:
        chan.send_frame({"type": "apply", "payload": payload.to_wire()})
        ack = chan.recv_frame(("applied",))
        results = ack.get("results")
        if ack.get("digest") != payload.digest() or not isinstance(results, list):
            raise AuthenticationError("the VM acknowledged a different payload than the one sent")
        applied = Applied(payload.digest(), tuple(r for r in results if isinstance(r, dict)))
        timings["apply"] = clock() - t0 - timings["hello"] - timings["handshake"]
    chan.send_frame({"type": "bye"})
    chan.close()
    return OwnerResult(vm_key, owner_key, auth, applied, timings)


# --- the VM's side ------------------------------------------------------------------------------------------------


class VmHandler(Protocol):
    def paired(self, owner_key: str, protocol: str) -> None:
        """Persist the pin (called once the owner is authenticated, before the VM says ready)."""

    def apply(self, payload: Payload) -> list[dict[str, Any]]:
        """Apply a verified payload; return one result per item. Raise HostguardError to refuse it."""


class VmState(Record, frozen=False):
    """What the VM knows. `owner_pin` and `secret` change when a shared-secret exchange succeeds."""

    key: Any
    protocol: str  # shared-secret | no-secrets | none (from the boot token)
    owner_pin: str | None = None
    secret: Secret | None = None
    paired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def vm_key(self) -> str:
        return public_key_hash(self.key.public_key())


class VmOutcome(Record):
    owner_key: str
    auth: str
    applied: int
    committed: bool = False  # this session paired the VM (and, for shared-secret, spent K)
    ended: str | None = None  # why the session ended without ``bye`` after the owner was authenticated


def vm_session(stream: Stream, state: VmState, handler: VmHandler, *, now: dt.datetime) -> VmOutcome:
    """Serve one owner connection. Refusals are sent to the peer, then raised (AuthenticationError for
    authentication, FormatError for the rest); a transport failure before the owner's confirm is raised as
    ChannelError saying that nothing was committed. After that point the session has succeeded whatever the
    transport does: a missing ``bye`` is reported in `VmOutcome.ended`, never raised."""
    io = Buffered(stream)
    try:
        hello = parse_owner_hello(io.read_line(OWNER_MAGIC, MAX_HELLO))
        owner_key = cert_key_hash(hello.cert)
    except VersionError:
        _refuse(io, "version")
        raise
    except FormatError:
        _refuse(io, "malformed")
        raise
    except OSError as exc:
        raise _lost(exc, "before the owner's hello") from None
    with state.lock:
        secret = state.secret if hello.auth == "secret" else None
        if hello.auth == "pinned":
            if state.owner_pin is None:
                _refuse(io, "owner-key-not-pinned")
                raise AuthenticationError("owner asked for pinned authentication, but no owner key is pinned")
            if owner_key != state.owner_pin:
                _refuse(io, "owner-key-mismatch")
                raise AuthenticationError(f"owner key {owner_key} is not the pinned {state.owner_pin}")
        elif secret is None or secret.wiped:
            _refuse(io, "no-secret")
            raise AuthenticationError("owner offered the shared secret, but this VM holds no unused K")
    unspent = "K not spent" if secret is not None else ("not paired" if not state.paired else "nothing changed")
    try:
        chan = _authenticate(io, state, hello, secret, now)
        # Key confirmation: the owner has verified us and kept our key; only now do we commit.
        check_keys_frame(chan.recv_frame(("confirm",)), state.vm_key, owner_key)
    except HostguardError as exc:
        if isinstance(exc, ChannelError):
            raise ChannelError(f"ended before the owner confirmed ({unspent}): {exc.message}") from None
        raise type(exc)(f"{exc.message} ({unspent})") from None
    except OSError as exc:
        raise _lost(exc, f"before the owner confirmed ({unspent})") from None
    committed = _commit(chan, state, handler, owner_key, secret)
    applied, ended = 0, None
    try:
        chan.send_frame(keys_frame("ready", state.vm_key, owner_key))
        owner_public = _cert_public_key(hello.cert)
        while True:
            frame = chan.recv_frame(("apply", "bye"))
            if frame["type"] == "bye":
                break
            if applied >= MAX_APPLIES:
                _refuse_in(chan, "protocol")
                raise FormatError(f"more than {MAX_APPLIES} payloads in one session")
            try:
                if set(frame) != {"type", "payload"}:
                    raise FormatError("apply frame is malformed")
                payload = payload_from_wire(frame["payload"])
                for script in payload.scripts:
                    verify_script(owner_public, script)
                results = handler.apply(payload)
            except HostguardError:
                _refuse_in(chan, "payload-rejected")
                raise
            applied += 1
            chan.send_frame({"type": "applied", "digest": payload.digest(), "results": results})
    except ChannelError as exc:
        ended = exc.message
    except OSError as exc:
        ended = f"{type(exc).__name__}: {exc.strerror or exc}"
    chan.close()  # close_notify, best effort: after bye the owner may be gone already
    return VmOutcome(owner_key, hello.auth, applied, committed, ended)


def _authenticate(
    io: Buffered, state: VmState, hello: OwnerHello, secret: Secret | None, now: dt.datetime
) -> TlsChannel:
    """Our hello, TLS 1.3 against the owner's announced certificate, and (shared secret) both K macs."""
    cert = ephemeral_cert(state.key, "vm", now)
    nonce = new_nonce()
    io.sendall(VmHello(True, cert, nonce).encode())
    chan = TlsChannel(
        tls_context(server=True, key=state.key, cert_der=cert, peer_cert_der=hello.cert), io, server_side=True
    )
    chan.handshake()
    if chan.peer_cert() != hello.cert:
        raise AuthenticationError("the owner's TLS certificate is not the one it announced")
    if secret is not None:
        transcript = binding_transcript(hello.cert, cert, hello.nonce, nonce)
        theirs = parse_mac(chan.recv_frame(("bind",)))
        if not hmac.compare_digest(theirs, binding_mac(secret, "owner", transcript)):
            _refuse_in(chan, "binding-failed")
            raise AuthenticationError("the owner's binding mac is wrong: wrong K, replay, or a relay terminated TLS")
        chan.send_frame({"type": "bind", "mac": binding_mac(secret, "vm", transcript)})
    return chan


def _commit(chan: TlsChannel, state: VmState, handler: VmHandler, owner_key: str, secret: Secret | None) -> bool:
    """Pin the owner for good (shared secret: and wipe K). True when this session changed the VM's state."""
    with state.lock:
        if secret is not None:
            if state.secret is not secret or secret.wiped:  # a concurrent session used K first
                _refuse_in(chan, "no-secret")
                raise AuthenticationError("K was used by another session meanwhile")
            handler.paired(owner_key, "shared-secret")
            state.owner_pin, state.paired, state.secret = owner_key, True, None
            secret.wipe()
            return True
        if not state.paired:
            handler.paired(owner_key, state.protocol)
            state.paired = True
            return True
    return False


def _lost(exc: OSError, when: str) -> ChannelError:
    return ChannelError(f"ended {when}: {type(exc).__name__}: {exc.strerror or exc}")


def _cert_public_key(cert_der: bytes) -> Any:
    from cryptography import x509

    return x509.load_der_x509_certificate(cert_der).public_key()


def _refuse(io: Buffered, reason: str) -> None:
    try:
        io.sendall(VmHello(False, reason=reason).encode())
    except OSError:
        return  # the peer is gone; the caller raises the real reason


def _refuse_in(chan: TlsChannel, reason: str) -> None:
    try:
        chan.send_frame({"type": "error", "reason": reason})
        chan.close()
    except (OSError, HostguardError):
        return  # as above
