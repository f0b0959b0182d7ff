"""Verify a signed envelope. Pure: envelope bytes, a trust store, a policy and `now` in; a typed result out.

Order matters: signature over the exact payload bytes first, then the payload type, only then parse the
manifest; chain, revocation and signer policy decide who signed; expiry decides whether this release may run
now. What depends on this host (rollback state, the files on disk) is checked by `hostguard.signed.facts`,
called from `hostguard.host.verify_files` — the one path the CLI, the hook and the library run (issue 13).

The result carries the interval of time in which the same inputs give the same answer (`valid_from`,
`valid_until`): the verdict cache uses an entry only inside it, so a cached answer is exactly a full
verification's (docs/adr/0007-cache-trust.md).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hostguard.errors import ExpiredError, FormatError, SignatureError, VerificationError
from hostguard.record import Record
from hostguard.signed.envelope import PAYLOAD_TYPE, Envelope, Signature, parse_envelope
from hostguard.signed.manifest import Manifest, parse_manifest
from hostguard.signed.policy import SignerInfo, SignerPolicy

if TYPE_CHECKING:
    from cryptography import x509

    from hostguard.signed.trust import TrustStore

CLOCK_SKEW = dt.timedelta(minutes=5)
# The cache window stays this far from every instant at which a time comparison could flip: `now` is a float
# at lookup and a microsecond datetime during verification, and X.509 times have second resolution.
WINDOW_MARGIN = dt.timedelta(milliseconds=1)


class VerifiedManifest(Record):
    manifest: Manifest
    signers: tuple[SignerInfo, ...]
    checks: tuple[str, ...]
    # An open interval around `now` that contains no instant at which any certificate, CRL or manifest time of
    # the inputs is crossed: inside it every time comparison, hence the whole answer, is the same as at `now`.
    # Empty (valid_from >= valid_until) when `now` sits on such an instant: nothing may be cached.
    valid_from: dt.datetime
    valid_until: dt.datetime


def _check_signature(envelope: Envelope, sig: Signature, store: TrustStore, now: dt.datetime) -> SignerInfo:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return _check_signature_unguarded(envelope, sig, store, now)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        # A certificate that parses lazily (key, extensions) can still be malformed: deny, one line.
        raise FormatError(f"malformed certificate in signature: {exc}") from None


def _certificates(sig: Signature) -> list[x509.Certificate]:
    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
    from hostguard.signed import trust

    return [c for pem in sig.certificates for c in trust.load_pem_certificates(pem, "envelope certificate")]


def _check_signature_unguarded(envelope: Envelope, sig: Signature, store: TrustStore, now: dt.datetime) -> SignerInfo:
    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
    from hostguard.signed import signing, trust

    certs = _certificates(sig)
    if not certs:
        raise FormatError("signature carries no certificate")
    leaf, untrusted = certs[0], certs[1:]
    try:
        signing.verify_signature(leaf.public_key(), sig.sig, envelope.pae())
    except SignatureError as exc:
        raise SignatureError(f"{exc.message} (leaf {trust.subject_of(leaf)!r})") from None
    chain = trust.verify_chain(leaf, untrusted, store, now)
    trust.check_revocation(chain, store, now)
    return SignerInfo(
        subject=trust.subject_of(leaf),
        common_name=trust.common_name(leaf),
        sans=trust.san_values(leaf),
        root_subject=trust.subject_of(chain[-1]),
        key_id=signing.key_id(leaf.public_key()),
        root_fingerprint=trust.fingerprint(chain[-1]),
    )


def verify_envelope(
    envelope_bytes: bytes, store: TrustStore, policy: SignerPolicy, now: dt.datetime
) -> VerifiedManifest:
    """Signature, payload type, chain, revocation, signer policy, expiry. Raises a VerificationError subclass.

    Not the entry point: `hostguard.host.verify_files.verify_files` calls this and then the per-host checks.
    """
    envelope = parse_envelope(envelope_bytes)
    checked: list[SignerInfo] = []
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
    try:
        manifest.image.name.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone surrogate (\ud800); no file, log line or database can hold it.
        raise FormatError(f"image name {manifest.image.name!r} is not valid Unicode") from None
    authorized = policy.verify(manifest.image.name, checked)
    checks = ("signature", "certificate chain", "revocation", "signer policy", "expiry")

    if now >= manifest.expires:
        raise ExpiredError(f"manifest of {manifest.image} expired at {manifest.expires.isoformat()}")
    if manifest.created > now and manifest.created - now > CLOCK_SKEW:  # no overflow near year 1 or 9999
        raise ExpiredError(f"manifest of {manifest.image} was created in the future ({manifest.created.isoformat()})")

    try:
        valid_from, valid_until = stable_window(now, time_events(envelope, store, manifest))
    except ValueError:  # a trust-store object whose times do not parse: allow now, cache nothing
        valid_from = valid_until = now
    return VerifiedManifest(manifest, authorized, checks, valid_from, valid_until)


def time_events(envelope: Envelope, store: TrustStore, manifest: Manifest) -> list[dt.datetime]:
    """Every instant at which a time comparison of this verification can change its outcome.

    All certificates of every signature (the ones that failed too: one becoming valid changes who signed) and
    of the trust store, every CRL's update times and revocation dates, the manifest's expiry and creation
    (less the allowed clock skew). Deliberately more than the certificates that satisfied the policy: the
    answer is a function of the inputs and of these comparisons only, so it cannot change between two events.
    """
    earliest = dt.datetime.min.replace(tzinfo=dt.UTC) + CLOCK_SKEW  # `created` in year 1 must not overflow
    events: list[dt.datetime] = [manifest.expires, max(manifest.created, earliest) - CLOCK_SKEW]
    for cert in (*store.roots, *store.intermediates):
        events += (cert.not_valid_before_utc, cert.not_valid_after_utc)
    for sig in envelope.signatures:
        try:
            events += [t for c in _certificates(sig) for t in (c.not_valid_before_utc, c.not_valid_after_utc)]
        except (VerificationError, ValueError):
            continue  # a certificate that does not parse fails at any time
    for crl in store.crls:
        events += _crl_events(crl)
    return events


def _crl_events(crl: x509.CertificateRevocationList) -> Iterable[dt.datetime]:
    yield crl.last_update_utc
    if crl.next_update_utc is not None:
        yield crl.next_update_utc
    for revoked in crl:
        yield revoked.revocation_date_utc


def stable_window(now: dt.datetime, events: Iterable[dt.datetime]) -> tuple[dt.datetime, dt.datetime]:
    """The largest open interval around `now` without an event, shrunk by WINDOW_MARGIN on each side.

    Empty (`now`, `now`) when `now` is within the margin of an event: nothing may be cached then.
    """
    lo = dt.datetime.min.replace(tzinfo=dt.UTC)
    hi = dt.datetime.max.replace(tzinfo=dt.UTC)
    for event in events:
        if event <= now:
            lo = max(lo, event)
        if event >= now:
            hi = min(hi, event)
    lo += WINDOW_MARGIN
    hi -= WINDOW_MARGIN
    return (lo, hi) if lo < now < hi else (now, now)
