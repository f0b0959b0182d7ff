"""Owner <-> VM session messages: cleartext hellos, framed messages inside TLS, the K binding, the payload.

Pure (stdlib + cryptography), part of the guest agent bundle. Wire format (version 2), in order:

1. owner -> VM, one line: ``HGOWN1 {"v":2,"auth":"secret"|"pinned","cert":<b64 DER>,"nonce":<32 hex>}``
2. VM -> owner, one line: ``HGVM1 {"v":2,"ok":true,"cert":<b64 DER>,"nonce":<32 hex>}`` or
   ``HGVM1 {"v":2,"ok":false,"reason":<code>}``. Certificates are ephemeral, self-signed, one per session; each
   side checks the peer's SubjectPublicKeyInfo hash against its pin *before* TLS and uses the peer's exact
   certificate as the only trust anchor of the TLS 1.3 handshake that follows (owner = client).
3. Inside TLS, frames of a 4-byte big-endian length + one compact JSON object with a ``type``, in this order:
   ``bind`` {mac} owner -> VM, then VM -> owner (shared secret only; the VM answers only a correct mac);
   ``confirm`` {vm_key, owner_key} owner -> VM: the owner has verified the VM (its mac, or its pinned key) and
   kept its key; only now may the VM commit (pin the owner, spend K); ``ready`` {vm_key, owner_key} VM -> owner:
   the VM has committed; then ``apply`` {payload} / ``applied`` {digest, results} pairs, and ``bye``. ``error``
   {reason} ends a session from either side. Why this order: docs/adr/0010-owner-key-confirmation.md.

Binding: mac = HMAC-SHA256(K, role || 0 || transcript), role ``owner`` or ``vm``; the transcript covers both
certificate fingerprints, both key hashes and both nonces, length-prefixed. A relay that terminates TLS on both
sides presents its own certificate to each, so the transcripts differ and it cannot compute either mac
without K; ephemeral certificates and nonces make every transcript unique, so a recorded mac is worthless.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from typing import Any

from hostguard import strictjson
from hostguard.errors import FormatError, HostguardError, VerificationError
from hostguard.owner.tokens import Secret, spki_hash
from hostguard.record import Record

OWNER_MAGIC = b"HGOWN1 "
VM_MAGIC = b"HGVM1 "
VERSION = 2  # 1: the VM committed before the owner had confirmed (issue 16)
MAX_HELLO = 4096
MAX_CERT = 2048
MAX_FRAME = 2 * 1024 * 1024
MAX_KEYS = 64
MAX_KEY_LINE = 8192
MAX_SCRIPTS = 16
MAX_SCRIPT = 256 * 1024
MAX_SCRIPTS_TOTAL = 1024 * 1024
AUTH_MODES = ("secret", "pinned")
REFUSALS = (
    "malformed",
    "owner-key-mismatch",
    "owner-key-not-pinned",
    "no-secret",
    "binding-failed",
    "payload-rejected",
    "protocol",
    "version",
)
FRAME_TYPES = ("bind", "confirm", "ready", "apply", "applied", "bye", "error")

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SSH_KEY = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [\x20-\x7e]{1,256})?"
)
_SCRIPT_CONTEXT = b"hostguard-script-v1\0"


class AuthenticationError(VerificationError):
    """The peer is not the one pinned, or the channel was tampered with: never trust this session."""

    check = "owner authentication"


class RefusedError(AuthenticationError):
    """The peer refused to authenticate us; `reason` is its refusal code (one of REFUSALS)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ChannelError(HostguardError):
    """The transport failed (closed, timed out, refused) before the protocol could decide anything."""


class VersionError(FormatError):
    """The peer speaks another version of the session protocol."""


# --- cleartext hellos -------------------------------------------------------------------------------------------


class OwnerHello(Record):
    auth: str  # secret | pinned
    cert: bytes  # DER
    nonce: str

    def encode(self) -> bytes:
        return _hello(OWNER_MAGIC, {"v": VERSION, "auth": self.auth, "cert": _b64(self.cert), "nonce": self.nonce})


class VmHello(Record):
    ok: bool
    cert: bytes = b""
    nonce: str = ""
    reason: str | None = None

    def encode(self) -> bytes:
        if self.ok:
            return _hello(VM_MAGIC, {"v": VERSION, "ok": True, "cert": _b64(self.cert), "nonce": self.nonce})
        return _hello(VM_MAGIC, {"v": VERSION, "ok": False, "reason": self.reason})


def parse_owner_hello(line: bytes) -> OwnerHello:
    obj = _parse_hello(line, OWNER_MAGIC, "owner hello")
    _exact(obj, {"v", "auth", "cert", "nonce"}, "owner hello")
    if obj["auth"] not in AUTH_MODES:
        raise FormatError("owner hello: unknown auth mode")
    return OwnerHello(obj["auth"], _cert_field(obj["cert"], "owner hello"), _nonce(obj["nonce"], "owner hello"))


def parse_vm_hello(line: bytes) -> VmHello:
    obj = _parse_hello(line, VM_MAGIC, "VM hello")
    if obj.get("ok") is True:
        _exact(obj, {"v", "ok", "cert", "nonce"}, "VM hello")
        return VmHello(True, _cert_field(obj["cert"], "VM hello"), _nonce(obj["nonce"], "VM hello"))
    if obj.get("ok") is False:
        _exact(obj, {"v", "ok", "reason"}, "VM hello")
        if obj["reason"] not in REFUSALS:
            raise FormatError("VM hello: unknown refusal")
        return VmHello(False, reason=obj["reason"])
    raise FormatError("VM hello: ok must be true or false")


def cert_key_hash(cert_der: bytes) -> str:
    """The key hash (pin) of the public key inside a DER certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_der_x509_certificate(cert_der)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError) as exc:
        raise FormatError(f"certificate does not parse: {str(exc)[:100]}") from None
    return spki_hash(spki)


# --- frames inside TLS --------------------------------------------------------------------------------------------


def encode_frame(obj: dict[str, Any]) -> bytes:
    if obj.get("type") not in FRAME_TYPES:
        raise FormatError("unknown frame type")
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_FRAME:
        raise FormatError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return struct.pack(">I", len(body)) + body


def frame_length(header: bytes, limit: int = MAX_FRAME) -> int:
    length: int = struct.unpack(">I", header)[0]
    if length == 0 or length > limit:
        raise FormatError(f"frame length {length} is out of range (1..{limit})")
    return length


def parse_frame(body: bytes, expect: tuple[str, ...]) -> dict[str, Any]:
    """A frame body as a dict; its type must be in `expect` or be ``error`` (raised as AuthenticationError
    for refusals that concern authentication, FormatError otherwise)."""
    obj = strictjson.loads(body, what="frame", max_size=MAX_FRAME, max_depth=6)
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise FormatError("frame is not an object with a type")
    kind = obj["type"]
    if kind == "error":
        reason = obj.get("reason")
        reason = reason if reason in REFUSALS else "malformed"
        raise refusal_error(reason, "peer")
    if kind not in expect:
        raise FormatError(f"unexpected {kind[:20]!r} frame (expected {'/'.join(expect)})")
    return obj


def refusal_error(reason: str, who: str) -> HostguardError:
    text = {
        "owner-key-mismatch": "the VM pinned a different owner key",
        "owner-key-not-pinned": "the VM knows no owner key (no no-secrets token, not paired): use the secret",
        "no-secret": "the VM has no unused shared secret (already paired, or attached for no-secrets)",
        "binding-failed": "shared-secret binding failed (wrong K, or a relay terminated TLS)",
        "payload-rejected": "the VM rejected the payload",
        "protocol": "protocol violation",
        "malformed": "malformed message",
        "version": f"it speaks another protocol version than {VERSION} (update the guest agent or the client)",
    }.get(reason, reason)
    if reason in ("payload-rejected", "protocol", "malformed", "version"):
        return FormatError(f"{who} refused: {text}")
    return RefusedError(f"{who} refused: {text}", reason)


# --- the K binding ---------------------------------------------------------------------------------------------


def binding_transcript(owner_cert: bytes, vm_cert: bytes, owner_nonce: str, vm_nonce: str) -> bytes:
    parts = [
        b"hostguard-owner-binding-v1",
        hashlib.sha256(owner_cert).digest(),
        hashlib.sha256(vm_cert).digest(),
        cert_key_hash(owner_cert).encode(),
        cert_key_hash(vm_cert).encode(),
        owner_nonce.encode(),
        vm_nonce.encode(),
    ]
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def binding_mac(secret: Secret, role: str, transcript: bytes) -> str:
    if role not in ("owner", "vm"):
        raise ValueError("role must be owner or vm")
    return secret.mac(role.encode() + b"\0" + transcript).hex()


def parse_mac(obj: dict[str, Any]) -> str:
    mac = obj.get("mac")
    if set(obj) != {"type", "mac"} or not isinstance(mac, str) or not _HEX64.fullmatch(mac):
        raise FormatError("bind frame is malformed")
    return mac


def keys_frame(kind: str, vm_key: str, owner_key: str) -> dict[str, Any]:
    """``confirm`` (owner -> VM) or ``ready`` (VM -> owner): both name the two keys of this session."""
    return {"type": kind, "vm_key": vm_key, "owner_key": owner_key}


def check_keys_frame(obj: dict[str, Any], vm_key: str, owner_key: str) -> None:
    """The peer's ``confirm``/``ready`` must name exactly this session's keys."""
    if set(obj) != {"type", "vm_key", "owner_key"} or obj["vm_key"] != vm_key or obj["owner_key"] != owner_key:
        raise AuthenticationError(f"the peer's {obj.get('type')} message names other keys than this session's")


# --- contextualization payload ----------------------------------------------------------------------------------


class Script(Record):
    name: str
    content: bytes
    signature: bytes  # Ed25519 by the owner key over _SCRIPT_CONTEXT || name || 0 || content


class Payload(Record):
    authorized_keys: tuple[str, ...] = ()
    scripts: tuple[Script, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": 1,
            "authorized_keys": list(self.authorized_keys),
            "scripts": [
                {"name": s.name, "content": _b64(s.content), "signature": _b64(s.signature)} for s in self.scripts
            ],
        }

    def digest(self) -> str:
        """What the VM reports back after applying: both sides compute it from the payload."""
        doc = {
            "authorized_keys": list(self.authorized_keys),
            "scripts": [[s.name, hashlib.sha256(s.content).hexdigest()] for s in self.scripts],
        }
        return "sha256:" + hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def script_message(name: str, content: bytes) -> bytes:
    return _SCRIPT_CONTEXT + name.encode() + b"\0" + content


def sign_script(private_key: Any, name: str, content: bytes) -> Script:
    check_script_name(name)
    return Script(name, content, private_key.sign(script_message(name, content)))


def verify_script(public_key: Any, script: Script) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(script.signature, script_message(script.name, script.content))
    except InvalidSignature:
        raise AuthenticationError(f"script {script.name!r} is not signed by the owner key") from None


def check_script_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise FormatError(f"script name {name[:40]!r} must be 1-64 of [A-Za-z0-9_.-]")
    return name


def check_authorized_key(line: str) -> str:
    if len(line) > MAX_KEY_LINE or not _SSH_KEY.fullmatch(line):
        raise FormatError(f"authorized key {line[:40]!r} is not a plain OpenSSH public key line")
    return line


def payload_from_wire(obj: object) -> Payload:
    """Strictly validate a payload received by the VM (signatures are checked by the caller)."""
    if not isinstance(obj, dict) or set(obj) != {"v", "authorized_keys", "scripts"} or obj["v"] != 1:
        raise FormatError("payload must be {v:1, authorized_keys, scripts}")
    keys, scripts = obj["authorized_keys"], obj["scripts"]
    if not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(isinstance(k, str) for k in keys):
        raise FormatError(f"payload authorized_keys must be a list of at most {MAX_KEYS} strings")
    if not isinstance(scripts, list) or len(scripts) > MAX_SCRIPTS:
        raise FormatError(f"payload scripts must be a list of at most {MAX_SCRIPTS}")
    out: list[Script] = []
    total = 0
    for item in scripts:
        if not isinstance(item, dict) or set(item) != {"name", "content", "signature"}:
            raise FormatError("payload script must be {name, content, signature}")
        if not isinstance(item["name"], str):
            raise FormatError("payload script name must be a string")
        content = _unb64(item["content"], MAX_SCRIPT, "script content")
        total += len(content)
        if total > MAX_SCRIPTS_TOTAL:
            raise FormatError(f"payload scripts exceed {MAX_SCRIPTS_TOTAL} bytes")
        out.append(Script(check_script_name(item["name"]), content, _unb64(item["signature"], 128, "signature")))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise FormatError("payload names a script twice")
    return Payload(tuple(check_authorized_key(k) for k in keys), tuple(out))


# --- helpers ----------------------------------------------------------------------------------------------------


def _hello(magic: bytes, obj: dict[str, Any]) -> bytes:
    line = magic + json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(line) > MAX_HELLO:
        raise FormatError("hello is too long")
    return line


def _parse_hello(line: bytes, magic: bytes, what: str) -> dict[str, Any]:
    if len(line) > MAX_HELLO:
        raise FormatError(f"{what} is longer than {MAX_HELLO} bytes")
    if not line.startswith(magic) or not line.endswith(b"\n"):
        raise FormatError(f"{what} does not start with {magic.decode().strip()}")
    obj = strictjson.loads(line[len(magic) : -1], what=what, max_size=MAX_HELLO, max_depth=2)
    if not isinstance(obj, dict) or not isinstance(obj.get("v"), int) or isinstance(obj.get("v"), bool):
        raise FormatError(f"{what} is not a versioned object")
    if obj["v"] != VERSION:
        raise VersionError(f"{what} is version {obj['v']}, this side speaks version {VERSION}")
    return obj


def _exact(obj: dict[str, Any], keys: set[str], what: str) -> None:
    if set(obj) != keys:
        raise FormatError(f"{what} has keys {sorted(obj)[:6]}, expected {sorted(keys)}")


def _nonce(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise FormatError(f"{what} nonce is malformed")
    return value


def _cert_field(value: object, what: str) -> bytes:
    return _unb64(value, MAX_CERT, f"{what} certificate")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, limit: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > (limit * 4) // 3 + 4:
        raise FormatError(f"{what} must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64") from None
