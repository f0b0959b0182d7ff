"""The owner's side: keys, endpoints, payload files, and `connect` (one authenticated session with a VM).

Endpoints: ``unix:/path`` or an absolute path (the host's socket of the VM's owner port, or a relay's), and
``tcp:HOST:PORT`` or ``HOST:PORT`` (a relay, or the agent's own TCP listener on a real network).

Payload file (JSON)::

    {"authorized_keys": ["ssh-ed25519 AAAA... me@laptop"],
     "scripts": [{"name": "setup", "path": "setup.sh"}]}

Script paths are relative to the payload file; each script is signed with the owner key here, and the VM
runs it only if the signature verifies under the owner key it pinned.

Shared secret: the moment the VM has proved K, its key is written to ``<secret file>.vm-key`` (before the
owner's confirm leaves, so before the VM can spend K). If the session is then cut, the owner keeps that key and
the error says so; running the same command again finishes the exchange, with K if the VM has not spent it,
else with the saved key pinned (docs/adr/0010-owner-key-confirmation.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostguard import strictjson
from hostguard.errors import FormatError, HostguardError, UsageError
from hostguard.host.fsutil import atomic_write, read_input
from hostguard.owner.protocol import ChannelError, Payload, RefusedError, check_authorized_key, sign_script
from hostguard.owner.session import OwnerResult, Progress, owner_session
from hostguard.owner.tlschannel import Stream, generate_key, load_private_key, private_key_pem
from hostguard.owner.tokens import Secret, parse_key_hash, public_key_hash
from hostguard.record import Record, replace

MAX_PAYLOAD_FILE = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0


class Endpoint(Record):
    kind: str  # unix | tcp
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    if text.startswith("unix:"):
        text = text[5:]
        if not text.startswith("/"):
            raise UsageError("unix endpoint needs an absolute path")
    if text.startswith("/"):
        return Endpoint("unix", path=text)
    text = text.removeprefix("tcp:")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"endpoint {text[:80]!r} is not unix:/PATH or HOST:PORT")
    return Endpoint("tcp", host=host.strip("[]"), port=int(port))


def open_stream(endpoint: Endpoint, timeout: float) -> socket.socket:
    try:
        if endpoint.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(endpoint.path)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None


# --- keys ---------------------------------------------------------------------------------------------------------


def keygen(path: Path) -> str:
    """Create an Ed25519 owner key at `path` (mode 0600, never overwrites); return its key hash."""
    key = generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: refusing to overwrite a key") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))
    return public_key_hash(key.public_key())


def load_owner_key(path: Path) -> Any:
    return load_private_key(_read(path, "owner key", 64 * 1024), f"owner key {path}")


def key_hash_of_file(path: Path) -> str:
    """The key hash of a PEM private key, public key or certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "key file", 64 * 1024)
    if b"PRIVATE KEY" in data:
        return public_key_hash(load_private_key(data, str(path)).public_key())
    try:
        if b"CERTIFICATE" in data:
            return public_key_hash(x509.load_pem_x509_certificate(data).public_key())
        return public_key_hash(serialization.load_pem_public_key(data))
    except ValueError:
        raise FormatError(f"{path} holds no PEM key or certificate") from None


# --- secret and payload files ---------------------------------------------------------------------------------


def load_secret(path: Path) -> Secret:
    """K from the owner's file. Refused when group or others can read it: K must never be world-readable."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"cannot read secret file {path}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UsageError(f"secret file {path} is readable by others: chmod 600 it (and consider K compromised)")
    return Secret.parse(_read(path, "secret file", 256))


def shred_file(path: Path) -> None:
    """Overwrite with random bytes, flush, unlink (best effort on copy-on-write filesystems)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.write(fd, os.urandom(max(size, 1)))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def load_payload(path: Path, key: Any) -> Payload:
    doc = strictjson.loads(_read(path, "payload", MAX_PAYLOAD_FILE), what=f"payload {path}", max_size=MAX_PAYLOAD_FILE)
    if not isinstance(doc, dict) or not set(doc) <= {"authorized_keys", "scripts"}:
        raise UsageError(f"payload {path} must be an object with authorized_keys and/or scripts")
    keys = doc.get("authorized_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UsageError(f"payload {path}: authorized_keys must be a list of strings")
    scripts = []
    for item in doc.get("scripts", []):
        if not isinstance(item, dict) or set(item) != {"name", "path"}:
            raise UsageError(f"payload {path}: each script is {{name, path}}")
        script_path = (path.parent / str(item["path"])).resolve()
        scripts.append(sign_script(key, str(item["name"]), _read(script_path, "script", 256 * 1024)))
    return Payload(tuple(check_authorized_key(k.strip()) for k in keys), tuple(scripts))


# --- the verified VM key ----------------------------------------------------------------------------------------


class VerifiedKeyFile(Record):
    """``<secret file>.vm-key``: the VM key that proved K, kept until the exchange is known to be complete.
    Tied to K by its commitment, so a file left from another K is ignored (and replaced)."""

    path: Path

    @classmethod
    def beside(cls, secret_file: Path) -> VerifiedKeyFile:
        return cls(secret_file.with_name(secret_file.name + ".vm-key"))

    def load(self, secret: Secret) -> str | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror}") from None
        doc = strictjson.loads(data, what=str(self.path), max_size=4096, max_depth=2)
        if not isinstance(doc, dict) or set(doc) != {"v", "vm_key", "k_check"} or doc["v"] != 1:
            raise UsageError(f"{self.path} is not a verified VM key file (delete it if it is not yours)")
        if doc["k_check"] != secret.check():
            return None  # left from another K
        return parse_key_hash(str(doc["vm_key"]), str(self.path))

    def save(self, vm_key: str, secret: Secret) -> None:

        doc = {"v": 1, "vm_key": vm_key, "k_check": secret.check()}
        try:
            atomic_write(self.path, json.dumps(doc).encode() + b"\n", mode=0o600)
        except OSError as exc:
            raise UsageError(f"cannot keep the verified VM key in {self.path}: {exc.strerror}") from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --- connect ----------------------------------------------------------------------------------------------------------


def exchange(
    opener: Callable[[], contextlib.AbstractContextManager[Stream]],
    key: Any,
    *,
    secret: Secret | None = None,
    vm_pin: str | None = None,
    payload: Payload | None = None,
    verified: VerifiedKeyFile | None = None,
    timeout_hint: str = "",
    progress: Progress | None = None,
) -> OwnerResult:
    """One owner exchange over streams from `opener`. With K and a `verified` file: the VM key is saved there
    as soon as the VM proves K; a saved key is required of the VM from then on; and when the VM says it has
    spent K (our confirm of a cut session reached it) the exchange finishes over a new stream with that key
    pinned. Errors after the VM was verified say where its key is kept. `progress` (optional) shows how far
    the first session got."""
    saved = verified.load(secret) if verified is not None and secret is not None else None
    if vm_pin is not None and saved is not None and vm_pin != saved:
        raise UsageError(f"--vm-key-hash {vm_pin} differs from the VM key {saved} verified with K ({verified})")
    pin = vm_pin or saved

    def keep(vm_key: str) -> None:
        if verified is not None and secret is not None and vm_key != saved:
            verified.save(vm_key, secret)

    progress = progress if progress is not None else Progress()
    progress.on_verified = keep
    try:
        try:
            return _one(opener, key, secret=secret, vm_pin=pin, payload=payload, progress=progress, hint=timeout_hint)
        except RefusedError as exc:
            if exc.reason != "no-secret" or secret is None or pin is None:
                raise
        # The VM has spent K. If on us (it got the confirm of a session that was cut after it), it pins our key.
        try:
            result = _one(opener, key, vm_pin=pin, payload=payload, progress=progress, hint=timeout_hint)
        except RefusedError as exc:
            if exc.reason != "owner-key-mismatch":
                raise
            raise RefusedError(
                f"{exc.message}: the VM spent K with another owner key, so somebody else held K", exc.reason
            ) from None
        return replace(result, resumed=True)
    except HostguardError as exc:
        if secret is None or progress.vm_key is None:
            raise
        where = f"saved in {verified.path}" if verified is not None else "not saved"
        if progress.committed:
            note = f"K is spent; the VM key {progress.vm_key} is verified ({where}): connect with --vm-key-hash"
        else:
            note = (
                f"the VM key {progress.vm_key} was verified with K before the session ended ({where}); "
                "run the same command again to finish (with K, or with that key if the VM has spent K)"
            )
        raise _annotated(exc, note) from None


def _one(
    opener: Callable[[], contextlib.AbstractContextManager[Stream]],
    key: Any,
    *,
    secret: Secret | None = None,
    vm_pin: str | None,
    payload: Payload | None,
    progress: Progress,
    hint: str,
) -> OwnerResult:
    try:
        with opener() as stream:
            return owner_session(
                stream,
                key,
                secret=secret,
                vm_pin=vm_pin,
                payload=payload,
                now=dt.datetime.now(dt.UTC),
                progress=progress,
            )
    except TimeoutError:
        raise ChannelError(f"no answer in time{hint}") from None
    except OSError as exc:
        raise ChannelError(f"{type(exc).__name__}: {exc.strerror or exc}") from None


def _annotated(exc: HostguardError, note: str) -> HostguardError:
    """The same error (class, refusal reason) with `note` appended to its one line."""
    if isinstance(exc, RefusedError):
        return RefusedError(f"{exc.message}; {note}", exc.reason)
    return type(exc)(f"{exc.message}; {note}")


def connect(
    endpoint: str,
    key_path: Path,
    *,
    secret_file: Path | None = None,
    vm_key_hash: str | None = None,
    payload_file: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    keep_secret: bool = False,
) -> OwnerResult:
    """Run the protocol against `endpoint`. With a secret file, K (and its .vm-key file) is shredded once the
    VM has confirmed that it spent K (K is worthless from then on: use the VM key hash printed now)."""
    if secret_file is None and vm_key_hash is None:
        raise UsageError("give --secret-file (shared-secret protocol) or --vm-key-hash (no-secrets, or after pairing)")
    key = load_owner_key(key_path)
    pin = parse_key_hash(vm_key_hash, "--vm-key-hash") if vm_key_hash else None
    secret = load_secret(secret_file) if secret_file else None
    payload = load_payload(payload_file, key) if payload_file else None
    target = parse_endpoint(endpoint)
    verified = VerifiedKeyFile.beside(secret_file) if secret_file is not None else None
    hint = f" from {target} ({timeout:.0f} s; is the guest agent running?)"
    try:
        result = exchange(
            lambda: open_stream(target, timeout),
            key,
            secret=secret,
            vm_pin=pin,
            payload=payload,
            verified=verified,
            timeout_hint=hint,
        )
    finally:
        if secret is not None:
            secret.wipe()
    if secret_file is not None and verified is not None and not keep_secret:
        shred_file(secret_file)
        verified.remove()
    return result


def _read(path: Path, what: str, limit: int) -> bytes:

    return read_input(str(path), what, limit)
