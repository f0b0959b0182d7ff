"""Signing and signature checks over DSSE PAE bytes.

Keys: ECDSA P-256 (SHA-256) and P-384 (SHA-384), RSA >= 2048 with PSS (SHA-256), Ed25519. Signing sits behind
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


def _ec_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    if isinstance(curve, ec.SECP256R1):
        return hashes.SHA256()
    if isinstance(curve, ec.SECP384R1):
        return hashes.SHA384()
    raise SignatureError(f"elliptic curve {curve.name} is not allowed (use P-256 or P-384)")


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def check_key_allowed(key: PublicKeyTypes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        _ec_hash(key.curve)
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SignatureError(f"RSA key of {key.key_size} bits is too small (need >= {MIN_RSA_BITS})")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"key type {type(key).__name__} is not allowed")


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
