"""Certificate chains and revocation. Pure: certificates and CRLs in, a verified chain or an error out.

Chains are built by `cryptography.x509.verification` at an explicit time with a code-signing end-entity policy
(codeSigning EKU required, CA:TRUE refused). That library does no revocation: `check_revocation` does it over
the CRLs in the trust store, and a CRL past its next_update is stale, which denies.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostguard.errors import ChainError, FormatError, RevocationError

MAX_CHAIN_DEPTH = 4


def subject_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def san_values(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = []
    for name in ext:
        if isinstance(name, x509.UniformResourceIdentifier | x509.RFC822Name | x509.DNSName):
            out.append(name.value)
    return tuple(out)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _check_canonical_signature(cert: x509.Certificate, what: str) -> None:
    """The signatureValue BIT STRING must have zero unused bits. The parser tolerates other values and the
    signature still verifies, so without this one certificate would have several accepted encodings."""
    from cryptography.hazmat.primitives.serialization import Encoding

    sig = cert.signature
    tail = b"\x03" + _der_length(len(sig) + 1) + b"\x00" + sig
    if not cert.public_bytes(Encoding.DER).endswith(tail):
        raise FormatError(f"{what}: certificate {subject_of(cert)!r} is not canonical DER (signature bit string)")


def load_pem_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise FormatError(f"{what} is not PEM certificates: {exc}") from None
    for cert in certs:
        _check_canonical_signature(cert, what)
    return certs


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise FormatError(f"{what} is not a CRL: {exc}") from None


@dataclass(frozen=True)
class TrustStore:
    """The host's anchors. `roots` are CA:TRUE certificates only (the loader enforces it)."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    # Subjects (RFC 4514) of CAs whose certificates may only be accepted with a current CRL; "*" means every CA.
    crl_required: frozenset[str] = field(default_factory=frozenset)


def _require_code_signing(_policy: verification.Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage) -> None:
    if ExtendedKeyUsageOID.CODE_SIGNING not in ext:
        raise ValueError(f"leaf {subject_of(cert)!r} has no codeSigning EKU")


def _refuse_ca_leaf(_policy: verification.Policy, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is not None and ext.ca:
        raise ValueError(f"leaf {subject_of(cert)!r} is a CA certificate (CA:TRUE)")


def _require_digital_signature(_policy: verification.Policy, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    if ext is not None and not ext.digital_signature:
        raise ValueError(f"leaf {subject_of(cert)!r} key usage lacks digitalSignature")


def _ee_policy() -> verification.ExtensionPolicy:
    c = verification.Criticality.AGNOSTIC
    return (
        verification.ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, c, None)
        .require_present(x509.ExtendedKeyUsage, c, _require_code_signing)
        .may_be_present(x509.BasicConstraints, c, _refuse_ca_leaf)
        .may_be_present(x509.KeyUsage, c, _require_digital_signature)
    )


def _explain(exc: Exception, leaf: x509.Certificate) -> str:
    text = str(exc)
    if "no codeSigning EKU" in text or "CA:TRUE" in text or "digitalSignature" in text:
        # Our own validator's message, wrapped by the library.
        start = text.find("leaf '")
        end = text.find(" (encountered processing")
        return text[start:end] if start >= 0 and end > start else text
    if "2.5.29.37" in text and "missing" in text:
        return f"leaf {subject_of(leaf)!r} has no extended key usage (codeSigning is required)"
    if "not valid at validation time" in text:
        subject = text.split("subject=<Name(", 1)[1].split(")>", 1)[0] if "subject=<Name(" in text else ""
        return f"certificate {subject!r} is expired or not yet valid at the verification time"
    if "candidates exhausted" in text:
        return f"leaf {subject_of(leaf)!r} does not chain to a trusted root"
    return f"leaf {subject_of(leaf)!r}: {text}"


def verify_chain(
    leaf: x509.Certificate,
    untrusted: Sequence[x509.Certificate],
    store: TrustStore,
    now: dt.datetime,
) -> list[x509.Certificate]:
    """The validated chain, leaf first, root last. Raises ChainError."""
    # A non-CA certificate in the store would verify as a chain of one: only CA:TRUE roots are anchors.
    anchors = [r for r in store.roots if is_ca(r)]
    if not anchors:
        raise ChainError("the trust store has no CA root certificates")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(anchors))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ee_policy=_ee_policy(), ca_policy=verification.ExtensionPolicy.webpki_defaults_ca())
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(leaf, [*untrusted, *store.intermediates]).chain)
    except verification.VerificationError as exc:
        raise ChainError(_explain(exc, leaf)) from None


def _crl_time(crl: x509.CertificateRevocationList) -> tuple[dt.datetime, dt.datetime | None]:
    return crl.last_update_utc, crl.next_update_utc


def _crls_by(
    issuer: x509.Certificate, crls: Iterable[x509.CertificateRevocationList]
) -> list[x509.CertificateRevocationList]:
    key = issuer.public_key()
    out = []
    for crl in crls:
        if crl.issuer != issuer.subject:
            continue
        # A CRL only counts when its issuer really signed it.
        if not isinstance(key, CertificateIssuerPublicKeyTypes) or not crl.is_signature_valid(key):  # type: ignore[arg-type]
            continue
        out.append(crl)
    return out


def check_revocation(chain: Sequence[x509.Certificate], store: TrustStore, now: dt.datetime) -> None:
    """Check every certificate below the root against its issuer's CRLs. Raises RevocationError."""
    for cert, issuer in itertools.pairwise(chain):
        issuer_subject = subject_of(issuer)
        crls = _crls_by(issuer, store.crls)
        if not crls:
            if "*" in store.crl_required or issuer_subject in store.crl_required:
                raise RevocationError(
                    f"no CRL from {issuer_subject!r} in the trust store, and the trust store requires one"
                )
            continue
        for crl in crls:
            last, nxt = _crl_time(crl)
            if nxt is None or now >= nxt or now < last:
                raise RevocationError(
                    f"CRL from {issuer_subject!r} is stale (next update {nxt.isoformat() if nxt else 'unset'}): "
                    "install a fresh CRL"
                )
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise RevocationError(f"certificate {subject_of(cert)!r} is revoked by {issuer_subject!r}")


def validity_window(chain: Sequence[x509.Certificate], store: TrustStore) -> tuple[dt.datetime, dt.datetime]:
    """The span of time over which the chain and the CRLs used for it stay as valid as they are now."""
    start = max(c.not_valid_before_utc for c in chain)
    end = min(c.not_valid_after_utc for c in chain)
    for issuer in chain[1:]:
        for crl in _crls_by(issuer, store.crls):
            last, nxt = _crl_time(crl)
            start = max(start, last)
            if nxt is not None:
                end = min(end, nxt)
    return start, end
