"""Verify a signed manifest. Pure: envelope bytes, a trust store, a policy and `now` in; a typed result out.

Order matters: signature over the exact payload bytes first, then the payload type, only then parse the
manifest; chain, revocation and signer policy decide who signed; expiry, rollback and disk digests decide
whether this release may run now on these files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hostguard.errors import (
    ExpiredError,
    FormatError,
    RollbackError,
    SignatureError,
    VerificationError,
)
from hostguard.signed.envelope import PAYLOAD_TYPE, Envelope, Signature, parse_envelope
from hostguard.signed.manifest import Blob, Manifest, parse_manifest
from hostguard.signed.policy import SignerInfo, SignerPolicy

if TYPE_CHECKING:
    from hostguard.signed.trust import TrustStore

CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class VerifiedManifest:
    manifest: Manifest
    signers: tuple[SignerInfo, ...]
    checks: tuple[str, ...]
    # While `now` stays inside this window, the same inputs give the same result (certificate and CRL
    # validity, manifest expiry): what lets a cache of verdicts be exact.
    valid_from: dt.datetime
    valid_until: dt.datetime


@dataclass(frozen=True)
class _CheckedSignature:
    signer: SignerInfo
    valid_from: dt.datetime
    valid_until: dt.datetime


def _check_signature(envelope: Envelope, sig: Signature, store: TrustStore, now: dt.datetime) -> _CheckedSignature:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return _check_signature_unguarded(envelope, sig, store, now)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        # A certificate that parses lazily (key, extensions) can still be malformed: deny, one line.
        raise FormatError(f"malformed certificate in signature: {exc}") from None


def _check_signature_unguarded(
    envelope: Envelope, sig: Signature, store: TrustStore, now: dt.datetime
) -> _CheckedSignature:
    from hostguard.signed import signing, trust

    certs = [c for pem in sig.certificates for c in trust.load_pem_certificates(pem, "envelope certificate")]
    if not certs:
        raise FormatError("signature carries no certificate")
    leaf, untrusted = certs[0], certs[1:]
    try:
        signing.verify_signature(leaf.public_key(), sig.sig, envelope.pae())
    except SignatureError as exc:
        raise SignatureError(f"{exc.message} (leaf {trust.subject_of(leaf)!r})") from None
    chain = trust.verify_chain(leaf, untrusted, store, now)
    trust.check_revocation(chain, store, now)
    start, end = trust.validity_window(chain, store)
    info = SignerInfo(
        subject=trust.subject_of(leaf),
        common_name=trust.common_name(leaf),
        sans=trust.san_values(leaf),
        root_subject=trust.subject_of(chain[-1]),
        key_id=signing.key_id(leaf.public_key()),
        root_fingerprint=trust.fingerprint(chain[-1]),
    )
    return _CheckedSignature(info, start, end)


def check_disks(manifest: Manifest, disks: Sequence[Blob]) -> None:
    """Each given disk must be a manifest disk, and every manifest disk must be given (no mix-and-match)."""
    from hostguard.signed import facts as imagefacts

    imagefacts.check_disks(imagefacts.ImageFacts.from_manifest(manifest), [(d.sha256, d.size) for d in disks])


def check_boot(manifest: Manifest, kernel: Blob | None, initrd: Blob | None) -> None:
    from hostguard.signed import facts as imagefacts

    imagefacts.check_boot(
        imagefacts.ImageFacts.from_manifest(manifest),
        (kernel.sha256, kernel.size) if kernel else None,
        (initrd.sha256, initrd.size) if initrd else None,
    )


def verify_envelope(
    envelope_bytes: bytes,
    store: TrustStore,
    policy: SignerPolicy,
    now: dt.datetime,
    *,
    highest_version: int | None = None,
    disks: Sequence[Blob] | None = None,
    kernel: Blob | None = None,
    initrd: Blob | None = None,
) -> VerifiedManifest:
    """All checks. Raises a VerificationError subclass naming the failed check."""
    envelope = parse_envelope(envelope_bytes)
    checked: list[_CheckedSignature] = []
    failures: list[VerificationError] = []
    for sig in envelope.signatures:
        try:
            checked.append(_check_signature(envelope, sig, store, now))
        except VerificationError as exc:
            failures.append(exc)
    if not checked:
        raise failures[0]
    if envelope.payload_type != PAYLOAD_TYPE:
        raise FormatError(f"payload type {envelope.payload_type[:80]!r} is not {PAYLOAD_TYPE!r}")
    manifest = parse_manifest(envelope.payload)
    checks = ["signature", "certificate chain", "revocation"]

    by_key = {c.signer.key_id: c for c in checked}
    authorized = policy.verify(manifest.image.name, [c.signer for c in checked])
    checks.append("signer policy")

    if now >= manifest.expires:
        raise ExpiredError(f"manifest of {manifest.image} expired at {manifest.expires.isoformat()}")
    if manifest.created > now + CLOCK_SKEW:
        raise ExpiredError(f"manifest of {manifest.image} was created in the future ({manifest.created.isoformat()})")
    checks.append("expiry")

    if highest_version is not None:
        if manifest.image.version < highest_version:
            raise RollbackError(
                f"{manifest.image} is older than version {highest_version} already verified on this host"
            )
        checks.append("rollback")

    if disks is not None:
        check_disks(manifest, disks)
        checks.append("disk digest")
    if kernel is not None or initrd is not None:
        check_boot(manifest, kernel, initrd)
        checks.append("boot files")

    used = [by_key[s.key_id] for s in authorized]
    return VerifiedManifest(
        manifest=manifest,
        signers=authorized,
        checks=tuple(checks),
        valid_from=max([c.valid_from for c in used] + [manifest.created - CLOCK_SKEW]),
        valid_until=min([c.valid_until for c in used] + [manifest.expires]),
    )
