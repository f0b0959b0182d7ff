"""The owner's side: keys, endpoints, payload files, and `connect` (one authenticated session with a VM).

Endpoints: ``unix:/path`` or an absolute path (the host's socket of the VM's owner port, or a relay's), and
``tcp:HOST:PORT`` or ``HOST:PORT`` (a relay, or the agent's own TCP listener on a real network).

Payload file (JSON)::

    {"authorized_keys": ["ssh-ed25519 AAAA... me@laptop"],
     "scripts": [{"name": "setup", "path": "setup.sh"}]}

Script paths are relative to the payload file; each script is signed with the owner key here, and the VM
runs it only if the signature verifies under the owner key it pinned.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostguard import strictjson
from hostguard.errors import FormatError, UsageError
from hostguard.owner.protocol import ChannelError, Payload, check_authorized_key, sign_script
from hostguard.owner.session import OwnerResult, owner_session
from hostguard.owner.tlschannel import generate_key, load_private_key, private_key_pem
from hostguard.owner.tokens import Secret, parse_key_hash, public_key_hash

MAX_PAYLOAD_FILE = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Endpoint:
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


# --- connect ----------------------------------------------------------------------------------------------------------


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
    """Run the protocol against `endpoint`. With a secret file, K is shredded after a successful exchange
    (it is worthless from then on: use the VM key hash printed now)."""
    if secret_file is None and vm_key_hash is None:
        raise UsageError("give --secret-file (shared-secret protocol) or --vm-key-hash (no-secrets, or after pairing)")
    key = load_owner_key(key_path)
    pin = parse_key_hash(vm_key_hash, "--vm-key-hash") if vm_key_hash else None
    secret = load_secret(secret_file) if secret_file else None
    payload = load_payload(payload_file, key) if payload_file else None
    target = parse_endpoint(endpoint)
    try:
        with open_stream(target, timeout) as sock:
            try:
                result = owner_session(
                    sock, key, secret=secret, vm_pin=pin, payload=payload, now=dt.datetime.now(dt.UTC)
                )
            except TimeoutError:
                raise ChannelError(
                    f"{target}: no answer within {timeout:.0f} s (is the guest agent running?)"
                ) from None
            except OSError as exc:
                raise ChannelError(f"{target}: {exc.strerror or exc}") from None
    finally:
        if secret is not None:
            secret.wipe()
    if secret_file is not None and not keep_secret:
        shred_file(secret_file)
    return result


def _read(path: Path, what: str, limit: int) -> bytes:
    from hostguard.host.fsutil import read_input

    return read_input(str(path), what, limit)
