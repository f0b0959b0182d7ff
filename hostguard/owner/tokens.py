"""Boot-channel tokens: key hashes, the SMBIOS OEM token, the shared secret K, and the return-channel lines.

Pure: takes and returns bytes/str, never touches files, libvirt or the clock. Runs inside guests too (it is
part of the guest agent bundle), so it needs only the standard library and `cryptography` >= 38.

Formats (all ASCII):

* key hash: ``sha256:<64 lowercase hex>`` of the DER SubjectPublicKeyInfo.
* OEM token (SMBIOS type 11 string, host -> guest, integrity trusted to the site):
  ``hgowner1:no-secrets:sha256:<hex>`` (the owner's key hash) or ``hgowner1:shared-secret`` (K is in fw_cfg).
* K (fw_cfg entry ``opt/org.hostguard/owner-k`` and the owner's secret file): ``hgk1.<base64url of 32 bytes>``.
* return channel (virtio-serial port ``org.hostguard.boot.0``), one JSON object per line, at most 1024 bytes:
  host ``{"v":1,"type":"query","nonce":"<32 hex>"}``; guest ``{"v":1,"type":"announce","nonce":...,
  "protocol":...,"state":...,"vm_key":...,"owner_key":...,"k_check":...,"error":...}``.
  ``k_check`` is the first 128 bits of SHA-256("hostguard-k-check-v1\\0" || K): it tells the host that the
  guest read *this* K (so the host file can be shredded) without revealing K.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from typing import Any

from hostguard import strictjson
from hostguard.errors import FormatError
from hostguard.owner.names import OEM_PREFIX
from hostguard.record import Record

PROTOCOLS = ("shared-secret", "no-secrets")
SECRET_PREFIX = b"hgk1."
SECRET_BYTES = 32
MAX_LINE = 1024
MAX_SECRET_FILE = 256
STATES = ("unpaired", "paired", "error")
ERROR_CODES = (
    "token-malformed",
    "token-ambiguous",
    "secret-missing",
    "secret-malformed",
    "state-unreadable",
)

_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_B64URL = re.compile(rb"[A-Za-z0-9_-]{43}")


# --- key hashes ---------------------------------------------------------------------------------------------


def spki_hash(spki_der: bytes) -> str:
    """The pin of a public key: ``sha256:<hex>`` of its DER SubjectPublicKeyInfo."""
    return "sha256:" + hashlib.sha256(spki_der).hexdigest()


def public_key_hash(public_key: Any) -> str:
    """The pin of a `cryptography` public key object."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki_hash(der)


def parse_key_hash(text: str, what: str = "key hash") -> str:
    """Normalize ``sha256:<hex>`` (or bare 64 hex digits, any case) to ``sha256:<lowercase hex>``."""
    value = text.strip().lower()
    if not value.startswith("sha256:"):
        value = "sha256:" + value
    if not _HASH.fullmatch(value):
        raise FormatError(f"{what} must be sha256:<64 hex digits>, got {text[:80]!r}")
    return value


# --- the OEM token (host -> guest, SMBIOS type 11) -----------------------------------------------------------


class BootToken(Record):
    protocol: str  # one of PROTOCOLS
    owner_key: str | None  # the owner's key hash (no-secrets only)

    def encode(self) -> str:
        if self.protocol == "no-secrets":
            if self.owner_key is None:
                raise FormatError("a no-secrets token needs the owner's key hash")
            return f"{OEM_PREFIX}no-secrets:{parse_key_hash(self.owner_key, 'owner key hash')}"
        if self.protocol == "shared-secret":
            return f"{OEM_PREFIX}shared-secret"
        raise FormatError(f"unknown protocol {self.protocol!r}")


def parse_boot_token(text: str) -> BootToken:
    """Parse one OEM string that starts with `OEM_PREFIX`. Anything not exactly a token is refused."""
    if len(text) > 200:
        raise FormatError("boot token is longer than 200 characters")
    if text == f"{OEM_PREFIX}shared-secret":
        return BootToken("shared-secret", None)
    head = f"{OEM_PREFIX}no-secrets:"
    if text.startswith(head) and _HASH.fullmatch(text[len(head) :]):
        return BootToken("no-secrets", text[len(head) :])
    raise FormatError(f"boot token {text[:80]!r} is malformed")


def find_boot_token(oem_strings: list[str]) -> BootToken | None:
    """The hostguard token among a guest's OEM strings (others are left alone). None when there is none;
    FormatError when one is malformed or two different tokens are present."""
    found = {parse_boot_token(s) for s in oem_strings if s.startswith(OEM_PREFIX)}
    if len(found) > 1:
        raise FormatError(f"{len(found)} different boot tokens in the OEM strings")
    return found.pop() if found else None


# --- the shared secret K --------------------------------------------------------------------------------------


class Secret:
    """The one-time shared secret K. Its repr never shows the value; `wipe()` zeroes the buffer (best effort:
    Python may have made other copies, which is why K lives only until the exchange is over)."""

    __slots__ = ("_key", "_wiped")

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != SECRET_BYTES:
            raise FormatError(f"shared secret must be {SECRET_BYTES} bytes")
        self._key = bytearray(key)
        self._wiped = False

    @classmethod
    def generate(cls) -> Secret:
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def parse(cls, data: bytes) -> Secret:
        """Read ``hgk1.<base64url>`` (one trailing newline allowed), e.g. a fw_cfg blob or the owner's file."""
        if len(data) > MAX_SECRET_FILE:
            raise FormatError("shared secret file is too large")
        body = data.removesuffix(b"\n")
        if not body.startswith(SECRET_PREFIX) or not _B64URL.fullmatch(body[len(SECRET_PREFIX) :]):
            raise FormatError("shared secret is not in hgk1.<base64url> form")
        return cls(base64.urlsafe_b64decode(body[len(SECRET_PREFIX) :] + b"="))

    def _live(self) -> bytes:
        if self._wiped:
            raise FormatError("shared secret was already used and wiped")
        return bytes(self._key)

    def encode(self) -> bytes:
        return SECRET_PREFIX + base64.urlsafe_b64encode(self._live()).rstrip(b"=") + b"\n"

    def check(self) -> str:
        """128-bit commitment to K, safe to show: lets the host see that the guest read this K."""
        return hashlib.sha256(b"hostguard-k-check-v1\0" + self._live()).hexdigest()[:32]

    def mac(self, message: bytes) -> bytes:
        return hmac.new(self._live(), message, hashlib.sha256).digest()

    def wipe(self) -> None:
        for i in range(len(self._key)):
            self._key[i] = 0
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickled (and so never written out by accident)
        raise TypeError("Secret cannot be pickled")


# --- return channel lines (virtio-serial org.hostguard.boot.0) -------------------------------------------------


def new_nonce() -> str:
    return secrets.token_hex(16)


def encode_query(nonce: str) -> bytes:
    return _line({"v": 1, "type": "query", "nonce": nonce})


def parse_query(line: bytes) -> str:
    """The nonce of a host query line. FormatError for anything else."""
    obj = _parse_line(line, "boot channel query")
    _exact_keys(obj, {"v", "type", "nonce"}, "boot channel query")
    if obj["type"] != "query" or not isinstance(obj["nonce"], str) or not _HEX32.fullmatch(obj["nonce"]):
        raise FormatError("boot channel query is malformed")
    return obj["nonce"]


class Announcement(Record):
    """What the guest agent publishes on the return channel. Nothing in it is secret."""

    nonce: str
    protocol: str  # shared-secret | no-secrets | none
    state: str  # unpaired | paired | error
    vm_key: str | None
    owner_key: str | None = None  # the owner key the guest pinned or was told (echoed for the owner to check)
    k_check: str | None = None  # shared-secret: commitment to the K the guest read
    error: str | None = None  # one of ERROR_CODES when state == "error"

    def to_line(self) -> bytes:
        return _line({"v": 1, "type": "announce", "nonce": self.nonce, **self.to_json()})  # keys sorted on the wire

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "state": self.state,
            "vm_key": self.vm_key,
            "owner_key": self.owner_key,
            "k_check": self.k_check,
            "error": self.error,
        }


def parse_announcement(line: bytes) -> Announcement:
    """Validate a guest announcement strictly: exact keys, known values, well-formed hashes."""
    what = "guest announcement"
    obj = _parse_line(line, what)
    _exact_keys(obj, {"v", "type", "nonce", "protocol", "state", "vm_key", "owner_key", "k_check", "error"}, what)
    if obj["type"] != "announce":
        raise FormatError(f"{what} has type {str(obj['type'])[:20]!r}")
    nonce = obj["nonce"]
    if not isinstance(nonce, str) or not _HEX32.fullmatch(nonce):
        raise FormatError(f"{what} nonce is malformed")
    protocol = obj["protocol"]
    if protocol not in (*PROTOCOLS, "none"):
        raise FormatError(f"{what} protocol is unknown")
    state = obj["state"]
    if state not in STATES:
        raise FormatError(f"{what} state is unknown")
    vm_key = _opt(obj["vm_key"], lambda v: parse_key_hash(v, "vm_key") == v, f"{what} vm_key")
    owner_key = _opt(obj["owner_key"], lambda v: parse_key_hash(v, "owner_key") == v, f"{what} owner_key")
    k_check = _opt(obj["k_check"], lambda v: _HEX32.fullmatch(v) is not None, f"{what} k_check")
    error = _opt(obj["error"], lambda v: v in ERROR_CODES, f"{what} error")
    if (state == "error") != (error is not None):
        raise FormatError(f"{what}: error must be given exactly when state is error")
    if state != "error" and vm_key is None:
        raise FormatError(f"{what} has no vm_key")
    return Announcement(nonce, protocol, state, vm_key, owner_key, k_check, error)


def _opt(value: object, ok: Any, what: str) -> Any:
    if value is None:
        return None
    try:
        good = isinstance(value, str) and ok(value)
    except FormatError:
        good = False
    if not good:
        raise FormatError(f"{what} is malformed")
    return value


def _line(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise FormatError("boot channel line is too long")
    return data


def _parse_line(line: bytes, what: str) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise FormatError(f"{what} is longer than {MAX_LINE} bytes")
    body = line.removesuffix(b"\n")
    if b"\n" in body or b"\r" in body:
        raise FormatError(f"{what} is not one line")
    obj = strictjson.loads(body, what=what, max_size=MAX_LINE, max_depth=2)
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    if obj.get("v") != 1 or isinstance(obj.get("v"), bool):
        raise FormatError(f"{what} has an unsupported version")
    return obj


def _exact_keys(obj: dict[str, Any], keys: set[str], what: str) -> None:
    if set(obj) != keys:
        extra = sorted(set(obj) - keys)[:3]
        missing = sorted(keys - set(obj))[:3]
        raise FormatError(f"{what}: unexpected keys {extra} / missing keys {missing}")
