"""Owner <-> VM sessions over socket pairs: both protocols, and the attacks each must detect."""

from __future__ import annotations

import contextlib
import json
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostguard.errors import FormatError, UsageError
from hostguard.owner import protocol, session
from hostguard.owner.protocol import (
    MAX_HELLO,
    VM_MAGIC,
    AuthenticationError,
    ChannelError,
    OwnerHello,
    Payload,
    binding_mac,
    binding_transcript,
    parse_vm_hello,
    sign_script,
)
from hostguard.owner.relay import Relay
from hostguard.owner.tlschannel import Buffered, TlsChannel, ephemeral_cert, generate_key, tls_context
from hostguard.owner.tokens import Secret, new_nonce
from tests.unit.owner_fakes import NOW, TerminatingRelay, Vm, in_thread, owner_hash, pair, run_session

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl owner@laptop"


def _copy(k: Secret) -> Secret:
    return Secret.parse(k.encode())


# --- the protocols work ---------------------------------------------------------------------------------------------


def test_shared_secret_pairs_once_then_pins() -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    owner = generate_key()
    payload = Payload((SSH_KEY,), (sign_script(owner, "hello", b"#!/bin/sh\necho hi\n"),))
    vm_out, owner_out = run_session(vm, owner, secret=_copy(k), payload=payload)
    assert owner_out.error is None, owner_out.error
    result = owner_out.value
    assert result.vm_key == vm.key_hash and result.owner_key == owner_hash(owner) and result.auth == "secret"
    assert result.applied is not None and result.applied.digest == payload.digest()
    assert vm.handler.pairings == [(owner_hash(owner), "shared-secret")]
    assert vm.handler.payloads == [payload]
    assert vm.state.owner_pin == owner_hash(owner) and vm.state.secret is None
    # from now on: pinned keys, no K
    vm_out, owner_out = run_session(vm, owner, vm_pin=result.vm_key)
    assert owner_out.error is None and vm_out.value.auth == "pinned"
    assert len(vm.handler.pairings) == 1


def test_no_secrets_pins_both_keys() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    _vm_out, owner_out = run_session(vm, owner, vm_pin=vm.key_hash)
    assert owner_out.error is None, owner_out.error
    assert owner_out.value.vm_key == vm.key_hash
    assert vm.handler.pairings == [(owner_hash(owner), "no-secrets")]
    assert vm.state.paired


def test_owner_needs_secret_or_pin() -> None:
    with pytest.raises(UsageError):
        session.owner_session(socket.socket(), generate_key(), now=NOW)


# --- shared secret: attacks ----------------------------------------------------------------------------------------


def test_wrong_k_is_detected_by_both_and_does_not_burn_the_real_k() -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    attacker = generate_key()
    vm_out, owner_out = run_session(vm, attacker, secret=Secret.generate())
    assert isinstance(owner_out.error, AuthenticationError) and "binding failed" in str(owner_out.error)
    assert isinstance(vm_out.error, AuthenticationError) and "binding mac is wrong" in str(vm_out.error)
    assert not vm.state.paired and vm.handler.pairings == []
    owner = generate_key()
    _, owner_out = run_session(vm, owner, secret=_copy(k))  # the real owner still succeeds
    assert owner_out.error is None and vm.state.owner_pin == owner_hash(owner)


def test_used_k_cannot_be_replayed() -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    owner = generate_key()
    run_session(vm, owner, secret=_copy(k))
    thief = generate_key()  # somebody who learned K after the exchange
    _vm_out, owner_out = run_session(vm, thief, secret=_copy(k))
    assert isinstance(owner_out.error, AuthenticationError) and "no unused shared secret" in str(owner_out.error)
    assert vm.state.owner_pin == owner_hash(owner)
    # even the real owner cannot use K twice: it must use the VM key hash now
    _, owner_out = run_session(vm, owner, secret=_copy(k))
    assert isinstance(owner_out.error, AuthenticationError)


def _raw_secret_client(sock: socket.socket, key: object, mac_for: object) -> str:
    """A client that completes hello + TLS with its own key, then sends a mac chosen by `mac_for(transcript)`.
    Returns the VM's answer frame type or raises what the VM raised."""
    io = Buffered(sock)
    cert = ephemeral_cert(key, "owner", NOW)
    nonce = new_nonce()
    io.sendall(OwnerHello("secret", cert, nonce).encode())
    hello = parse_vm_hello(io.read_line(VM_MAGIC, MAX_HELLO))
    chan = TlsChannel(
        tls_context(server=False, key=key, cert_der=cert, peer_cert_der=hello.cert), io, server_side=False
    )
    chan.handshake()
    transcript = binding_transcript(cert, hello.cert, nonce, hello.nonce)
    chan.send_frame({"type": "bind", "mac": mac_for(transcript)})  # type: ignore[operator]
    return str(chan.recv_frame(("bind", "ready"))["type"])


def test_recorded_binding_mac_replayed_in_a_new_session_fails() -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    key = generate_key()
    recorded: list[str] = []

    def honest(transcript: bytes) -> str:
        mac = binding_mac(k, "owner", transcript)
        recorded.append(mac)
        return mac

    # Session 1 is interrupted after the owner's mac was sent (recorded by an eavesdropper on the host).
    a, b = pair()
    t, _ = in_thread(lambda: vm.serve(a))
    with b:
        assert _raw_secret_client(b, key, honest) == "bind"
    t.join(10)
    vm2 = Vm.shared_secret(_copy(k))  # a fresh VM with the same K: only the replay differs
    a, b = pair()
    t, vm_out = in_thread(lambda: vm2.serve(a))
    with b, pytest.raises(AuthenticationError, match="binding failed"):
        _raw_secret_client(b, key, lambda _t: recorded[0])
    t.join(10)
    assert isinstance(vm_out.error, AuthenticationError) and not vm2.state.paired


def test_mac_for_the_wrong_role_is_refused() -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    a, b = pair()
    t, _vm_out = in_thread(lambda: vm.serve(a))
    with b, pytest.raises(AuthenticationError):
        _raw_secret_client(b, generate_key(), lambda tr: binding_mac(k, "vm", tr))  # reflection
    t.join(10)
    assert not vm.state.paired


def test_relay_terminating_tls_on_both_sides_is_detected_shared_secret() -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    owner = generate_key()
    relay = TerminatingRelay(vm)
    a, b = pair()
    t, _ = in_thread(lambda: relay.run(a))
    with b, pytest.raises(AuthenticationError, match="binding failed"):
        session.owner_session(b, owner, secret=_copy(k), now=NOW)
    t.join(30)
    assert isinstance(relay.upstream.error, AuthenticationError)  # the VM refused the relay's binding
    assert isinstance(relay.real_vm.error, AuthenticationError)
    assert not vm.state.paired


def test_lenient_relay_that_skips_the_check_is_still_caught_by_the_owner() -> None:
    """The relay accepts the owner's mac without checking and answers with a made-up one."""
    k = Secret.generate()
    owner = generate_key()
    relay_key = generate_key()
    a, b = pair()

    def lenient_vm() -> None:
        io = Buffered(a)
        hello = protocol.parse_owner_hello(io.read_line(protocol.OWNER_MAGIC, MAX_HELLO))
        cert = ephemeral_cert(relay_key, "vm", NOW)
        io.sendall(protocol.VmHello(True, cert, new_nonce()).encode())
        chan = TlsChannel(
            tls_context(server=True, key=relay_key, cert_der=cert, peer_cert_der=hello.cert), io, server_side=True
        )
        chan.handshake()
        chan.recv_frame(("bind",))
        chan.send_frame({"type": "bind", "mac": "00" * 32})
        chan.send_frame({"type": "ready", "vm_key": "x", "owner_key": "y"})

    t, _ = in_thread(lenient_vm)
    with b, pytest.raises(AuthenticationError, match="binding mac is wrong"):
        session.owner_session(b, owner, secret=_copy(k), now=NOW)
    t.join(10)


# --- no secrets: attacks --------------------------------------------------------------------------------------------


def test_relay_swapping_the_vm_key_is_detected_by_the_owner() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    relay = TerminatingRelay(vm, owner_pin_for_vm_side=owner_hash(owner))
    a, b = pair()
    t, _ = in_thread(lambda: relay.run(a))
    with b, pytest.raises(AuthenticationError, match="is not the pinned"):
        session.owner_session(b, owner, vm_pin=vm.key_hash, now=NOW)
    t.join(30)
    # toward the real VM the relay has to present its own owner key: refused too
    assert isinstance(relay.upstream.error, AuthenticationError) and "owner key" in str(relay.upstream.error)
    assert not vm.state.paired


def test_relay_forwarding_the_real_hello_but_terminating_tls_fails_the_handshake() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    relay_key = generate_key()
    a, b = pair()
    real_a, real_b = pair()
    t_vm, _ = in_thread(lambda: vm.serve(real_a))

    def relay() -> None:
        io = Buffered(a)
        line = io.read_line(protocol.OWNER_MAGIC, MAX_HELLO)
        hello = protocol.parse_owner_hello(line)
        real_b.sendall(line)
        vm_line = Buffered(real_b).read_line(VM_MAGIC, MAX_HELLO)
        io.sendall(vm_line)  # the genuine VM hello, then TLS with the relay's own key
        cert = ephemeral_cert(relay_key, "vm", NOW)
        ctx = tls_context(server=True, key=relay_key, cert_der=cert, peer_cert_der=hello.cert)
        TlsChannel(ctx, io, server_side=True).handshake()

    t, relay_out = in_thread(relay)
    with b, pytest.raises(AuthenticationError, match="TLS"):
        session.owner_session(b, owner, vm_pin=vm.key_hash, now=NOW)
    t.join(10)
    real_b.close()
    t_vm.join(10)
    assert relay_out.error is not None


def test_tampered_oem_token_means_the_owner_is_refused() -> None:
    owner = generate_key()
    site_key = generate_key()
    vm = Vm.no_secrets(owner_hash(site_key))  # the site put its own key hash into the OEM string
    vm_out, owner_out = run_session(vm, owner, vm_pin=vm.key_hash)
    assert isinstance(owner_out.error, AuthenticationError) and "different owner key" in str(owner_out.error)
    assert isinstance(vm_out.error, AuthenticationError)
    assert not vm.state.paired


def test_wrong_vm_pin_is_refused_before_tls() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    _, owner_out = run_session(vm, owner, vm_pin="sha256:" + "00" * 32)
    assert isinstance(owner_out.error, AuthenticationError)


def test_secret_offered_to_a_no_secrets_vm_is_refused() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    _, owner_out = run_session(vm, owner, secret=Secret.generate())
    assert isinstance(owner_out.error, AuthenticationError) and "no unused shared secret" in str(owner_out.error)


def test_pinned_owner_unknown_to_an_unpaired_shared_secret_vm() -> None:
    vm = Vm.shared_secret(Secret.generate())
    _, owner_out = run_session(vm, generate_key(), vm_pin=vm.key_hash)
    assert isinstance(owner_out.error, AuthenticationError) and "knows no owner key" in str(owner_out.error)


# --- payloads ---------------------------------------------------------------------------------------------------------


def test_script_not_signed_by_the_pinned_owner_is_rejected() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    forged = sign_script(generate_key(), "evil", b"#!/bin/sh\nrm -rf /\n")
    vm_out, owner_out = run_session(vm, owner, vm_pin=vm.key_hash, payload=Payload((), (forged,)))
    assert isinstance(vm_out.error, AuthenticationError) and "not signed by the owner" in str(vm_out.error)
    assert isinstance(owner_out.error, FormatError) and "rejected the payload" in str(owner_out.error)
    assert vm.handler.payloads == []


@pytest.mark.parametrize(
    "wire",
    [
        {"v": 1, "authorized_keys": ['command="/bin/sh" ' + SSH_KEY], "scripts": []},
        {"v": 1, "authorized_keys": [SSH_KEY + "\nssh-rsa AAAA x"], "scripts": []},
        {"v": 1, "authorized_keys": [], "scripts": [{"name": "../x", "content": "", "signature": ""}]},
        {"v": 1, "authorized_keys": [], "scripts": [{"name": "a", "content": "!!", "signature": ""}]},
        {"v": 1, "authorized_keys": [], "scripts": [{"name": "a", "content": "QQ==", "signature": "QQ=="}] * 2},
        {"v": 1, "authorized_keys": ["x"] * 65, "scripts": []},
        {"v": 2, "authorized_keys": [], "scripts": []},
        {"v": 1, "authorized_keys": [], "scripts": [], "extra": 1},
        ["not", "an", "object"],
    ],
)
def test_malformed_payload_is_refused(wire: object) -> None:
    with pytest.raises(FormatError):
        protocol.payload_from_wire(wire)


def test_payload_digest_covers_content() -> None:
    key = generate_key()
    a = Payload((SSH_KEY,), (sign_script(key, "s", b"one"),))
    b = Payload((SSH_KEY,), (sign_script(key, "s", b"two"),))
    assert a.digest() != b.digest() and a.digest() == protocol.payload_from_wire(a.to_wire()).digest()


# --- hostile bytes ----------------------------------------------------------------------------------------------


def _vm_against(raw: bytes) -> tuple[BaseException | None, bytes]:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    a, b = pair()
    t, out = in_thread(lambda: vm.serve(a))
    with b:
        with contextlib.suppress(OSError):  # the VM may close early
            b.sendall(raw)
        b.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := b.recv(65536):
                answer += chunk
        except OSError:
            pass
    t.join(10)
    return out.error, answer


@pytest.mark.parametrize(
    "raw",
    [
        b"HGOWN1 {}\n",
        b"HGOWN1 " + b"x" * 5000 + b"\n",
        b"HGOWN1 " + json.dumps({"v": 1, "auth": "pinned", "cert": "AAAA", "nonce": "0" * 32}).encode() + b"\n",
        b"HGOWN1 " + json.dumps({"v": 1, "auth": "root", "cert": "", "nonce": "0" * 32}).encode() + b"\n",
        b"\x00" * 70000,
        b"",
    ],
)
def test_malformed_or_oversized_hello_is_refused_without_crashing(raw: bytes) -> None:
    error, answer = _vm_against(raw)
    assert isinstance(error, FormatError | ChannelError), error
    if raw.startswith(b"HGOWN1"):
        assert answer.startswith(b"HGVM1 ") and b'"ok":false' in answer


def test_stale_bytes_before_the_hello_are_skipped() -> None:
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    a, b = pair()
    t, vm_out = in_thread(lambda: vm.serve(a))
    b.sendall(b"\x16\x03\x01 leftovers of an earlier session\n")
    with b:
        result = session.owner_session(b, owner, vm_pin=vm.key_hash, now=NOW)
    t.join(10)
    assert result.vm_key == vm.key_hash and vm_out.error is None


def test_oversized_frame_inside_tls_is_refused() -> None:
    with pytest.raises(FormatError):
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(FormatError):
        protocol.frame_length(struct.pack(">I", 0))


# --- the honest relay -------------------------------------------------------------------------------------------


def test_byte_relay_over_tcp_carries_a_session_unchanged(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    owner = generate_key()
    vm = Vm.no_secrets(owner_hash(owner))
    path = tmp_path / "owner.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def vm_side() -> None:
        conn, _ = server.accept()
        conn.settimeout(10)
        vm.serve(conn)

    t, vm_out = in_thread(vm_side)
    relay = Relay(("127.0.0.1", 0), path, idle_timeout=10)
    tr, _ = in_thread(lambda: relay.serve(max_connections=1))
    with socket.create_connection(relay.address, timeout=10) as sock:
        result = session.owner_session(sock, owner, vm_pin=vm.key_hash, now=NOW)
    t.join(10)
    tr.join(10)
    relay.close()
    server.close()
    assert result.vm_key == vm.key_hash and vm_out.error is None


@given(st.binary(max_size=3000))
@settings(max_examples=60, deadline=None)
def test_any_bytes_after_the_magic_are_refused_cleanly(tail: bytes) -> None:
    error, _ = _vm_against(b"HGOWN1 " + tail + b"\n")
    assert isinstance(error, FormatError | ChannelError | AuthenticationError), repr(error)
