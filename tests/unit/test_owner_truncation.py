"""Issue 16: a relay that holds no key cuts, stalls, delays or replays the owner exchange at every unit boundary
(the hello lines and each TLS record, in each direction), over in-memory streams with the real session and
client code. Afterwards the honest owner completes the exchange with the same K (or pinned, for no-secrets), or
already holds the right VM key; the VM never commits (pins an owner, spends K) for an owner that did not confirm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostguard.errors import HostguardError, UsageError
from hostguard.owner import guest_agent
from hostguard.owner.owner_client import VerifiedKeyFile, exchange
from hostguard.owner.protocol import AuthenticationError, ChannelError, Payload, sign_script
from hostguard.owner.session import OwnerResult, Progress, VmState
from hostguard.owner.tlschannel import generate_key
from hostguard.owner.tokens import Secret
from tests.unit.owner_fakes import (
    O2V,
    V2O,
    Cut,
    CuttingRelay,
    Net,
    Vm,
    clean_counts,
    in_thread,
    owner_hash,
    serve_stream,
)

OWNER = generate_key()
PAYLOAD = Payload((), (sign_script(OWNER, "setup", b"#!/bin/sh\necho hi\n"),))
PROTOCOLS = ("shared-secret", "no-secrets")


def _copy(k: Secret) -> Secret:
    return Secret.parse(k.encode())


@dataclass
class Attempt:
    result: OwnerResult | None
    error: HostguardError | None
    progress: Progress


def _attempt(net: Net, vm: Vm, k: Secret | None, verified: VerifiedKeyFile | None, payload: Payload | None) -> Attempt:
    """The owner's real client path (`owner_client.exchange`), as `hostguard owner connect` runs it."""
    progress = Progress()
    try:
        result = exchange(
            net.open,
            OWNER,
            secret=None if k is None else _copy(k),
            vm_pin=None if k is not None else vm.key_hash,  # no-secrets: the owner has the VM key from the site
            payload=payload,
            verified=verified,
            progress=progress,
        )
        return Attempt(result, None, progress)
    except HostguardError as exc:
        return Attempt(None, exc, progress)
    finally:
        net.join()


def _vm(protocol: str, k: Secret) -> Vm:
    return Vm.shared_secret(_copy(k)) if protocol == "shared-secret" else Vm.no_secrets(owner_hash(OWNER))


def check_cut(protocol: str, cut: Cut, tmp: Path, *, timeout: float = 10.0) -> str:
    """One cut exchange, the invariants, and the honest owner's retry; returns what the cut left behind."""
    k = Secret.generate()
    vm = _vm(protocol, k)
    secret = k if protocol == "shared-secret" else None
    verified = VerifiedKeyFile(tmp / "k.vm-key") if secret is not None else None
    first = _attempt(Net(vm, cut, timeout=timeout), vm, secret, verified, PAYLOAD)
    where = f"{protocol} {cut}: {first.error!r}"

    committed = bool(vm.handler.pairings)
    if committed:  # the VM committed: only for this owner, only after its confirm of the right VM key
        assert vm.handler.pairings == [(owner_hash(OWNER), protocol)], where
        assert first.progress.confirmed and first.progress.vm_key == vm.key_hash, where
        if verified is not None:
            assert verified.load(k) == vm.key_hash, where  # kept on disk before the confirm left
    elif protocol == "shared-secret":
        assert vm.state.secret is not None and not vm.state.secret.wiped, where  # K not spent
        assert not vm.state.paired and vm.state.owner_pin is None, where
    else:
        assert not vm.state.paired, where
    if first.progress.vm_key is not None:
        assert first.progress.vm_key == vm.key_hash, where
    if first.error is not None and secret is not None and first.progress.vm_key is not None:
        assert vm.key_hash in str(first.error) and "saved in" in str(first.error), where  # says so

    if first.error is None:
        kind = "complete"
    elif committed:
        kind = "committed, owner not told"
    elif first.progress.vm_key is not None:
        kind = "verified, not committed"
    else:
        kind = "nothing"

    # The honest owner runs the same command again over an honest path: it must succeed.
    retry = _attempt(Net(vm), vm, secret, verified, PAYLOAD)
    assert retry.error is None, f"{where}; retry: {retry.error!r}"
    assert retry.result is not None and retry.result.vm_key == vm.key_hash, where
    assert retry.result.resumed == (committed and secret is not None), where  # K spent on us: pinned retry
    assert retry.result.applied is not None and retry.result.applied.digest == PAYLOAD.digest(), where
    assert vm.handler.pairings == [(owner_hash(OWNER), protocol)], where  # paired once, with the owner
    assert vm.state.owner_pin == owner_hash(OWNER) and vm.state.paired, where
    assert vm.state.secret is None, where
    return kind


@pytest.mark.parametrize("mode", ["hangup", "close"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_relay_hanging_up_at_every_boundary_never_strands_the_owner(protocol: str, mode: str, tmp_path: Path) -> None:
    counts = clean_counts(protocol, PAYLOAD, OWNER)
    kinds: Counter[str] = Counter()
    for direction in (O2V, V2O):
        for keep in range(counts[direction] + 1):
            case = tmp_path / f"{direction[:2]}{keep}"
            case.mkdir()
            kinds[check_cut(protocol, Cut(direction, keep, mode), case)] += 1
    assert sum(kinds.values()) == counts[O2V] + counts[V2O] + 2
    # the sweep reaches every state a cut can leave behind, including the two issue 16 is about
    assert set(kinds) == {"nothing", "verified, not committed", "committed, owner not told", "complete"}, kinds


@pytest.mark.parametrize("direction", [O2V, V2O])
def test_relay_silently_dropping_one_direction_at_every_boundary(direction: str, tmp_path: Path) -> None:
    """No hang-up: one direction goes dark while the other flows; both ends give up on their timeouts."""
    counts = clean_counts("shared-secret", PAYLOAD, OWNER)
    for keep in range(counts[direction] + 1):
        case = tmp_path / str(keep)
        case.mkdir()
        check_cut("shared-secret", Cut(direction, keep, "blackhole"), case, timeout=0.3)


def test_issue_16_relay_drops_what_the_vm_sends_after_the_owners_first_encrypted_flight(tmp_path: Path) -> None:
    """The reported attack: hellos and TLS handshake forwarded both ways; after the owner's client Finished and
    binding mac, everything the VM sends is dropped and the relay hangs up. K used to be burnt here."""
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    handshake_units = clean_counts("shared-secret", None)[V2O] - 3  # after it: bind, ready, close_notify
    verified = VerifiedKeyFile(tmp_path / "k.vm-key")
    net = Net(vm, Cut(V2O, handshake_units))
    first = _attempt(net, vm, k, verified, None)
    assert isinstance(first.error, ChannelError) and first.progress.vm_key is None
    assert not vm.state.paired and vm.handler.pairings == [] and vm.state.secret is not None  # K not spent
    vm_error = net.vm_outcomes[0].error
    assert isinstance(vm_error, ChannelError) and "K not spent" in str(vm_error)
    again = _attempt(Net(vm), vm, k, verified, None)  # the same K still works
    assert again.error is None and again.result is not None and again.result.auth == "secret"
    assert vm.handler.pairings == [(owner_hash(OWNER), "shared-secret")]


def test_confirm_delayed_past_the_owners_timeout_then_delivered(tmp_path: Path) -> None:
    """The relay holds the owner's confirm until the owner gave up, then delivers it: the VM commits while the
    owner believes it failed. The owner kept the VM key, so its retry finishes with that key pinned."""
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    confirm = clean_counts("shared-secret", None)[O2V] - 3  # before it: hello + handshake + bind
    relay = CuttingRelay(Cut(O2V, confirm, "hold"), 0.3, vm_timeout=10.0)
    t, vm_out = in_thread(lambda: serve_stream(vm, relay.vm))
    verified = VerifiedKeyFile(tmp_path / "k.vm-key")
    progress = Progress()
    with pytest.raises(ChannelError, match="was verified with K before the session ended") as err:
        exchange(lambda: relay.owner, OWNER, secret=_copy(k), verified=verified, progress=progress)
    assert vm.key_hash in str(err.value) and verified.load(k) == vm.key_hash
    assert progress.confirmed and not progress.committed and not vm.state.paired
    relay.release()
    t.join(10)
    assert vm_out.error is None and vm_out.value.committed and vm_out.value.ended is not None
    assert vm.state.owner_pin == owner_hash(OWNER) and vm.state.secret is None  # K spent on the owner
    retry = _attempt(Net(vm), vm, k, verified, None)
    assert retry.error is None and retry.result is not None and retry.result.resumed
    assert retry.result.vm_key == vm.key_hash and retry.result.auth == "pinned"


def test_replayed_owner_bytes_do_not_commit_a_vm(tmp_path: Path) -> None:
    """Everything the owner sent in a complete exchange, replayed byte for byte into a new session with a VM
    holding the same K: TLS fails (fresh server randomness), nothing is committed, K is not spent."""
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    net = Net(vm)
    assert _attempt(net, vm, k, None, PAYLOAD).error is None
    recorded = b"".join(net.relays[0].cutter.units[O2V])
    twin = Vm.shared_secret(_copy(k))
    relay = CuttingRelay(timeout=2.0)
    t, vm_out = in_thread(lambda: serve_stream(twin, relay.vm))
    with relay.owner:
        relay.owner.sendall(recorded)
    t.join(10)
    assert isinstance(vm_out.error, AuthenticationError) and "TLS" in str(vm_out.error), vm_out.error
    assert not twin.state.paired and twin.handler.pairings == [] and twin.state.secret is not None


def test_a_saved_vm_key_from_another_k_is_ignored_and_a_different_vm_is_refused(tmp_path: Path) -> None:
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    verified = VerifiedKeyFile(tmp_path / "k.vm-key")
    verified.save("sha256:" + "ab" * 32, Secret.generate())  # left over from another K: ignored
    assert verified.load(k) is None
    # a key verified with this K is required of the VM from then on (a K holder cannot swap the VM later)
    verified.save("sha256:" + "cd" * 32, k)
    attempt = _attempt(Net(vm), vm, k, verified, None)
    assert isinstance(attempt.error, AuthenticationError) and "is not the pinned" in str(attempt.error)
    assert not vm.state.paired and vm.state.secret is not None


def test_agent_logs_success_as_success_and_cuts_as_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each session ends in exactly one log line. A successful one stays a success when the close_notify
    after ``bye`` hits a host side that is gone (the virtio-serial port raises ChannelError then)."""
    k = Secret.generate()
    store = guest_agent.Store(tmp_path / "state")
    store.ensure()
    state = VmState(key=generate_key(), protocol="shared-secret", secret=_copy(k))
    agent = guest_agent.Agent(store, guest_agent.Boot(state, k.check(), None, {}), tmp_path / "ak")
    vm_key = state.vm_key

    def session_through(relay: CuttingRelay, **kw: object) -> HostguardError | None:
        t, _ = in_thread(lambda: agent.serve(relay.vm, "test"))
        try:
            exchange(lambda: relay.owner, OWNER, **kw)  # type: ignore[arg-type]
            return None
        except HostguardError as exc:
            return exc
        finally:
            t.join(10)

    # wrong K: refused (K not spent); cut before the confirm: interrupted (K not spent)
    assert session_through(CuttingRelay(), secret=Secret.generate()) is not None
    assert session_through(CuttingRelay(Cut(V2O, 4)), secret=_copy(k)) is not None
    # success, with the owner's bye and close_notify held until the owner has hung up
    bye = clean_counts("shared-secret", None)[O2V] - 2
    relay = CuttingRelay(Cut(O2V, bye, "hold"), vm_port=True)
    t, _ = in_thread(lambda: agent.serve(relay.vm, "test"))
    result = exchange(lambda: relay.owner, OWNER, secret=_copy(k))
    relay.release()
    t.join(10)
    assert result.vm_key == vm_key and state.paired
    lines = [line for line in capsys.readouterr().out.splitlines() if "owner session" in line]
    assert len(lines) == 3, lines
    assert "refused" in lines[0] and "binding mac is wrong" in lines[0] and "(K not spent)" in lines[0]
    assert "interrupted" in lines[1] and "K not spent" in lines[1]
    assert "succeeded: secret owner" in lines[2] and "without bye" not in lines[2], lines[2]
    assert not any("refused" in line for line in lines[1:])


def test_owner_that_cannot_keep_the_vm_key_does_not_confirm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping the VM key comes first: if it cannot be written (here: a full disk), no confirm leaves and K
    stays unspent."""
    import errno

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hostguard.owner.owner_client.atomic_write", full)
    k = Secret.generate()
    vm = Vm.shared_secret(_copy(k))
    net = Net(vm)
    attempt = _attempt(net, vm, k, VerifiedKeyFile(tmp_path / "k.vm-key"), None)
    assert isinstance(attempt.error, UsageError) and "cannot keep the verified VM key" in str(attempt.error)
    assert attempt.progress.vm_key is None and not attempt.progress.confirmed
    assert not vm.state.paired and vm.state.secret is not None and not vm.state.secret.wiped
    vm_error = net.vm_outcomes[0].error  # the VM saw the session end before any confirm
    assert isinstance(vm_error, ChannelError) and "K not spent" in str(vm_error), vm_error
