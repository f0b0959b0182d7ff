"""Signing and signature checks over DSSE PAE bytes.

Keys: ECDSA P-256 (SHA-256) and P-384 (SHA-384), RSA 2048..16384 bits with exponent 65537 and PSS (SHA-256),
Ed25519 (not of small order). `weak_key` applies the strength limits to every key of a chain, whatever the CA
certified. Signing sits behind
`Signer` (like securesystemslib's) so a PKCS#11 or KMS signer can be added by key URI later; `file:` now.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from hostguard.errors import SignatureError, UsageError

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
RSA_EXPONENT = 65537

# Ed25519 arithmetic (RFC 8032 5.1), only to tell whether a public key has small order.
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _ec_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    if isinstance(curve, ec.SECP256R1):
        return hashes.SHA256()
    if isinstance(curve, ec.SECP384R1):
        return hashes.SHA384()
    raise SignatureError(f"elliptic curve {curve.name} is not allowed (use P-256 or P-384)")


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def _ed25519_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return (x1 * y2 + x2 * y1) * pow(1 + t, _P - 2, _P) % _P, (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P


def ed25519_small_order(raw: bytes) -> bool:
    """True for an encoding that is not a canonical curve point, or a point of order 1, 2, 4 or 8. With such a
    public key, one signature (R of small order, S = 0) verifies for every message: OpenSSL does not refuse it."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if len(raw) != 32 or y >= _P:
        return True
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P or (x == 0 and raw[31] >> 7):
        return True  # not on the curve, or the non-canonical "-0"
    if x & 1 != raw[31] >> 7:
        x = _P - x
    point = (x, y)
    for _ in range(3):  # times the cofactor 8
        point = _ed25519_add(point, point)
    return point == (0, 1)


def weak_key(key: PublicKeyTypes) -> str | None:
    """Why `key` is too weak to trust whatever a CA certified, or None. Applies to CA keys as well as leaves."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too small (need >= {MIN_RSA_BITS})"
        if key.key_size > MAX_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too large (at most {MAX_RSA_BITS})"
        if key.public_numbers().e != RSA_EXPONENT:
            return f"RSA public exponent {key.public_numbers().e} is not {RSA_EXPONENT}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if ed25519_small_order(raw):
            return "Ed25519 public key is of small order (or not a canonical point)"
    return None


def check_key_allowed(key: PublicKeyTypes) -> None:
    """A signing key: one of the allowed types and curves, and not weak."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        _ec_hash(key.curve)
    elif not isinstance(key, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise SignatureError(f"key type {type(key).__name__} is not allowed")
    weak = weak_key(key)
    if weak is not None:
        raise SignatureError(weak)


def verify_signature(key: PublicKeyTypes, sig: bytes, data: bytes) -> None:
    """Raise SignatureError unless `sig` is a valid signature of `data` by `key`."""
    check_key_allowed(key)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(_ec_hash(key.curve)))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                sig, data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO), hashes.SHA256()
            )
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
    except InvalidSignature:
        raise SignatureError("signature does not match the payload") from None


def key_id(key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo: identifies a key across certificates (threshold counting)."""
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


class Signer(ABC):
    """Something that can sign bytes and name its public key."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes: ...

    @abstractmethod
    def public_key(self) -> PublicKeyTypes: ...


class PrivateKeySigner(Signer):
    def __init__(self, key: PrivateKeyTypes) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise UsageError(f"key type {type(key).__name__} cannot sign hostguard manifests")
        check_key_allowed(key.public_key())
        self._key = key

    def public_key(self) -> PublicKeyTypes:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(_ec_hash(key.curve)))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, _pss(), hashes.SHA256())
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key.sign(data)


def load_signer(uri: str, passphrase: Callable[[], bytes | None] = lambda: None) -> Signer:
    """A signer from a key URI: `file:PATH` or a plain path. The passphrase comes from a callback, not a prompt."""
    path = Path(uri.removeprefix("file:"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{path} is not a usable PEM private key: {exc}") from None
    return PrivateKeySigner(key)
