"""DSSE envelopes (secure-systems-lab/dsse protocol v1). Pure: bytes in, typed values out.

The signature covers PAE(payloadType, payload). Verifiers check the signature over the exact payload bytes
first, then the type, and only then parse the payload: nothing is re-serialized before it is verified.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from hostguard import strictjson
from hostguard.errors import FormatError
from hostguard.record import Record

PAYLOAD_TYPE = "application/vnd.hostguard.manifest.v1+json"
MAX_ENVELOPE_BYTES = 96 * 1024 * 1024  # a 64 MiB manifest in base64, plus signatures
MAX_SIGNATURES = 16
MAX_CERTIFICATES = 8
MAX_CERT_PEM_BYTES = 64 * 1024
_B64 = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def b64decode(text: object, what: str) -> bytes:
    """Standard or URL-safe base64, with or without padding (DSSE allows all four)."""
    if not isinstance(text, str) or not _B64.fullmatch(text):
        raise FormatError(f"{what} is not base64")
    if ("+" in text or "/" in text) and ("-" in text or "_" in text):
        raise FormatError(f"{what} mixes standard and URL-safe base64 alphabets")
    std = text.replace("-", "+").replace("_", "/").rstrip("=")
    if len(std) % 4 == 1:
        raise FormatError(f"{what} has an impossible base64 length")
    std += "=" * (-len(std) % 4)
    try:
        return base64.b64decode(std, validate=True)
    except binascii.Error as exc:
        raise FormatError(f"{what} is not base64: {exc}") from None


class Signature(Record):
    keyid: str  # a hint only: never used to decide trust
    sig: bytes
    certificates: tuple[bytes, ...]  # PEM: leaf first, then intermediates


class Envelope(Record):
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def to_bytes(self) -> bytes:
        doc = {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [
                {
                    "keyid": s.keyid,
                    "sig": base64.b64encode(s.sig).decode("ascii"),
                    "certificates": [c.decode("ascii") for c in s.certificates],
                }
                for s in self.signatures
            ],
        }
        return (json.dumps(doc, indent=1) + "\n").encode("utf-8")

    def with_signature(self, signature: Signature) -> Envelope:
        return Envelope(self.payload_type, self.payload, (*self.signatures, signature))


def _parse_signature(raw: object, i: int) -> Signature:
    what = f"envelope signatures[{i}]"
    if not isinstance(raw, dict):
        raise FormatError(f"{what} must be a JSON object")
    unknown = sorted(set(raw) - {"keyid", "sig", "certificates"})
    if unknown:
        raise FormatError(f"{what} has unknown key {unknown[0]!r}")
    keyid = raw.get("keyid", "")
    if not isinstance(keyid, str) or len(keyid) > 256:
        raise FormatError(f"{what}.keyid must be a string of at most 256 characters")
    sig = b64decode(raw.get("sig"), f"{what}.sig")
    if not sig or len(sig) > 1024:
        raise FormatError(f"{what}.sig must be 1..1024 bytes")
    certs = raw.get("certificates")
    if not isinstance(certs, list) or not certs:
        raise FormatError(f"{what} carries no certificates: the leaf certificate is required")
    if len(certs) > MAX_CERTIFICATES:
        raise FormatError(f"{what} carries more than {MAX_CERTIFICATES} certificates")
    pems: list[bytes] = []
    for j, pem in enumerate(certs):
        if not isinstance(pem, str) or not pem.isascii() or len(pem) > MAX_CERT_PEM_BYTES:
            raise FormatError(f"{what}.certificates[{j}] must be an ASCII PEM string")
        if pem.count("-----BEGIN") != 1:
            # One certificate per string: several PEM blocks in one would slip past the certificate limit.
            raise FormatError(f"{what}.certificates[{j}] must hold exactly one PEM certificate")
        pems.append(pem.encode("ascii"))
    return Signature(keyid=keyid, sig=sig, certificates=tuple(pems))


def parse_envelope(data: bytes) -> Envelope:
    """Parse envelope bytes. Checks shape only; signatures are verified by `hostguard.signed.verify`."""
    doc = strictjson.loads(data, what="envelope", max_size=MAX_ENVELOPE_BYTES, max_depth=4)
    if not isinstance(doc, dict):
        raise FormatError("envelope must be a JSON object")
    unknown = sorted(set(doc) - {"payloadType", "payload", "signatures"})
    if unknown:
        raise FormatError(f"envelope has unknown key {unknown[0]!r}")
    payload_type = doc.get("payloadType")
    if not isinstance(payload_type, str):
        raise FormatError("envelope payloadType must be a string")
    payload = b64decode(doc.get("payload"), "envelope payload")
    sigs = doc.get("signatures")
    if not isinstance(sigs, list):
        raise FormatError("envelope signatures must be a list")
    if not sigs:
        raise FormatError("envelope has no signatures")
    if len(sigs) > MAX_SIGNATURES:
        raise FormatError(f"envelope has more than {MAX_SIGNATURES} signatures")
    return Envelope(payload_type, payload, tuple(_parse_signature(s, i) for i, s in enumerate(sigs)))
