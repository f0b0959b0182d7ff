"""Certificate chains and revocation. Pure: certificates and CRLs in, a verified chain or an error out.

Chains are built by `cryptography.x509.verification` at an explicit time with a code-signing end-entity policy
(codeSigning EKU required, CA:TRUE refused) and a CA policy whose EKU check asks for codeSigning (the library's
own asks for the TLS purpose of the verifier it builds). Every key in the chain must pass
`signing.weak_key`. That library does no revocation: `check_revocation` does it over the CRLs in the
trust store. A CRL counts only when its issuer's key signed it and its issuer name equals the certificate
issuer's as RFC 5280 compares names; any such CRL that lists the serial revokes it, any such CRL past its
next_update denies, and only a complete CRL in the certificate's scope (IssuingDistributionPoint) satisfies
`require_crl`. Delta, indirect and unknown-critical-extension CRLs are refused when loaded.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostguard.errors import ChainError, ConfigError, CrlStateError, FormatError, RevocationError
from hostguard.record import Record, field
from hostguard.signed import signing

MAX_CHAIN_DEPTH = 4
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
# Attribute names for parsing configured names: cryptography's parser knows CN, L, ST, O, OU, C, STREET, DC
# and UID in upper case only; RFC 4514 names are case-insensitive.
_DN_UPPER = {
    "CN": NameOID.COMMON_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "E": NameOID.EMAIL_ADDRESS,
}
_DN_NAMES = {
    **_DN_UPPER,
    **{k.lower(): v for k, v in _DN_UPPER.items()},
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "serialNumber": NameOID.SERIAL_NUMBER,
}


def subject_of(cert: x509.Certificate) -> str:
    """The subject for people to read (RFC 4514), never compared for trust. It is raw, untrusted text: messages
    quote it with `!r` (which escapes what is not printable) and other sinks pass it through `printable`."""
    return cert.subject.rfc4514_string()


def fingerprint(cert: x509.Certificate) -> str:
    """`sha256:` and the hex SHA-256 of the DER certificate: how signers.toml pins a root exactly."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return "sha256:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


NameKey = tuple[frozenset[tuple[str, object]], ...]


def _norm_value(value: str | bytes) -> object:
    """RFC 4518 string preparation, as far as caseIgnoreMatch needs it: compatibility normalisation, case
    folding, insignificant spaces removed. Binary values compare exactly."""
    if isinstance(value, bytes):
        return value
    return " ".join(unicodedata.normalize("NFKC", value).casefold().split())


def name_key(name: x509.Name) -> NameKey:
    """A value equal for two names exactly when RFC 5280 (section 7.1) says they match: same RDNs in the same
    order, each a set of (type, caseIgnoreMatch-prepared value). The ASN.1 string types do not matter."""
    return tuple(frozenset((a.oid.dotted_string, _norm_value(a.value)) for a in rdn) for rdn in name.rdns)


@functools.lru_cache(maxsize=256)
def parse_dn(text: str) -> tuple[NameKey, NameKey]:
    """A configured distinguished name (signers.toml), as keys in both orders: RFC 4514 writes the last RDN
    first, `openssl x509 -subject` and most people write the certificate's order. ConfigError if it does not
    parse."""
    candidates = [text, re.sub(r"(?<!\\)([,+])\s+", r"\1", text.strip())]
    for candidate in candidates:
        try:
            name = x509.Name.from_rfc4514_string(candidate, _DN_NAMES)
        except ValueError:
            continue
        if name.rdns:
            key = name_key(name)
            return key, key[::-1]
    raise ConfigError(f"signers.toml: {text!r} is not a distinguished name (write it as 'CN=...,O=...')")


def dn_matches(text: str, name: x509.Name) -> bool:
    return name_key(name) in parse_dn(text)


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's one common name. Several CNs are refused: which one is "the" name differs between tools."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) > 1:
        raise ChainError(f"leaf {subject_of(cert)!r} has {len(attrs)} common names; a signer has at most one")
    return str(attrs[0].value) if attrs else None


SAN_KINDS: tuple[tuple[type[x509.GeneralName], str], ...] = (
    (x509.UniformResourceIdentifier, "uri"),
    (x509.RFC822Name, "email"),
    (x509.DNSName, "dns"),
)


def san_values(cert: x509.Certificate) -> tuple[tuple[str, str], ...]:
    """(kind, value) of the leaf's URI, email and DNS subject alternative names: a policy names the kind it
    means, so a DNS name never stands in for a URI identity."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[tuple[str, str]] = []
    for name in ext:
        for cls, kind in SAN_KINDS:
            if isinstance(name, cls):
                out.append((kind, str(name.value)))
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


# CRL extensions hostguard understands (RFC 5280 5.2): any other critical one makes the CRL unusable.
_CRL_EXTENSIONS = (x509.CRLNumber, x509.AuthorityKeyIdentifier, x509.IssuingDistributionPoint, x509.FreshestCRL)
_CRL_ENTRY_EXTENSIONS = (x509.CRLReason, x509.InvalidityDate)


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    """A complete, direct CRL. Delta CRLs (not complete), indirect CRLs (entries for other issuers) and CRLs
    with a critical extension hostguard does not process are refused: RFC 5280 forbids using those to decide
    revocation, and accepting them as "the CRL" would let `require_crl` pass without the revocations."""
    try:
        pem = data.lstrip().startswith(b"-----BEGIN")
        crl = x509.load_pem_x509_crl(data) if pem else x509.load_der_x509_crl(data)
        _check_crl_extensions(crl, what)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise FormatError(f"{what} is not a CRL: {exc}") from None
    return crl


def _check_crl_extensions(crl: x509.CertificateRevocationList, what: str) -> None:
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            raise FormatError(f"{what} is a delta CRL: hostguard needs the issuer's complete CRL")
        if isinstance(ext.value, x509.IssuingDistributionPoint) and ext.value.indirect_crl:
            raise FormatError(f"{what} is an indirect CRL: hostguard needs one signed by the issuer itself")
        if ext.critical and not isinstance(ext.value, _CRL_EXTENSIONS):
            raise FormatError(f"{what} has a critical extension hostguard does not know ({ext.oid.dotted_string})")
    for entry in crl:
        for ext in entry.extensions:
            if isinstance(ext.value, x509.CertificateIssuer):
                raise FormatError(f"{what} has entries for other issuers (an indirect CRL)")
            if ext.critical and not isinstance(ext.value, _CRL_ENTRY_EXTENSIONS):
                raise FormatError(
                    f"{what}: entry {entry.serial_number} has a critical extension hostguard does not know "
                    f"({ext.oid.dotted_string})"
                )


class TrustStore(Record):
    """The host's anchors. `roots` are CA:TRUE certificates only (the loader enforces it)."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    # Distinguished names (RFC 4514, either RDN order) of CAs whose certificates may only be accepted with a
    # current, complete CRL in scope; "*" means every CA. `check_crl_requirements` says whether each names a CA.
    crl_required: frozenset[str] = field(default_factory=frozenset)

    def requires_crl(self, issuer: x509.Certificate) -> bool:
        return "*" in self.crl_required or any(
            dn_matches(entry, issuer.subject) for entry in self.crl_required if entry != "*"
        )


def check_crl_requirements(store: TrustStore) -> None:
    """Each require_crl entry must name a CA the trust directory knows (a root, an intermediate or a CRL
    issuer): a typo must be an error, not a requirement that silently never applies."""
    known = [c.subject for c in (*store.roots, *store.intermediates)] + [crl.issuer for crl in store.crls]
    for entry in sorted(store.crl_required - {"*"}):
        if not any(dn_matches(entry, name) for name in known):
            raise ConfigError(
                f"signers.toml: require_crl entry {entry!r} names no root, intermediate or CRL issuer in the "
                "trust directory"
            )


def resolve_roots(store: TrustStore) -> Callable[[str], frozenset[str]]:
    """For signers.toml's `root`: the fingerprints of the configured roots a value names, a subject (either RDN
    order) or `sha256:<hex>`. A value naming no root, or a subject two roots share, is a ConfigError: another
    root with the same subject must not satisfy the pin."""
    roots = {fingerprint(r): r for r in store.roots}

    def resolve(value: str) -> frozenset[str]:
        if _FINGERPRINT.fullmatch(value):
            found = {value} & roots.keys()
        else:
            found = {fp for fp, cert in roots.items() if dn_matches(value, cert.subject)}
        if not found:
            raise ConfigError(f"signers.toml: root {value!r} names no certificate in roots/")
        if len(found) > 1:
            raise ConfigError(
                f"signers.toml: root {value!r} names {len(found)} certificates in roots/; pin one by its "
                f"fingerprint ({', '.join(sorted(found))})"
            )
        return frozenset(found)

    return resolve


def _require_code_signing(_policy: verification.Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage) -> None:
    if ExtendedKeyUsageOID.CODE_SIGNING not in ext:
        raise ValueError(f"leaf {subject_of(cert)!r} has no codeSigning EKU")


def _ca_may_issue_code_signing(
    _policy: verification.Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None
) -> None:
    # Replaces the default check, which asks a CA's EKU for the verifier's TLS purpose (clientAuth here).
    if ext is not None and not _eku_allows_code_signing(ext):
        raise ValueError(f"CA {subject_of(cert)!r} extended key usage does not include codeSigning")


def _eku_allows_code_signing(ext: x509.ExtendedKeyUsage) -> bool:
    return ExtendedKeyUsageOID.CODE_SIGNING in ext or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in ext


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


def _ca_policy() -> verification.ExtensionPolicy:
    c = verification.Criticality.AGNOSTIC
    return verification.ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, c, _ca_may_issue_code_signing
    )


def _eku_refusal(candidates: Iterable[x509.Certificate]) -> str:
    """Why a chain may have failed that the library's "candidates exhausted" does not say."""
    for cert in candidates:
        try:
            ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if is_ca(cert) and not _eku_allows_code_signing(ext):
            return f" (CA {subject_of(cert)!r} is limited by its extended key usage to other purposes than codeSigning)"
    return ""


def _explain(exc: Exception, leaf: x509.Certificate, candidates: Sequence[x509.Certificate]) -> str:
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
        return f"leaf {subject_of(leaf)!r} does not chain to a trusted root{_eku_refusal(candidates)}"
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
        .extension_policies(ee_policy=_ee_policy(), ca_policy=_ca_policy())
        .build_client_verifier()
    )
    intermediates = [*untrusted, *store.intermediates]
    try:
        chain = list(verifier.verify(leaf, intermediates).chain)
    except verification.VerificationError as exc:
        raise ChainError(_explain(exc, leaf, [*intermediates, *anchors])) from None
    for cert in chain[1:]:
        # Whatever the CA did: a weak key anywhere in the chain makes every signature below it worthless.
        weak = signing.weak_key(cert.public_key())
        if weak is not None:
            raise ChainError(f"CA {subject_of(cert)!r}: {weak}")
    return chain


def _crl_time(crl: x509.CertificateRevocationList) -> tuple[dt.datetime, dt.datetime | None]:
    return crl.last_update_utc, crl.next_update_utc


def _crls_by(
    issuer: x509.Certificate, crls: Iterable[x509.CertificateRevocationList]
) -> list[x509.CertificateRevocationList]:
    """The CRLs `issuer` signed whose issuer name matches its subject as RFC 5280 compares names."""
    return [crl for crl in crls if _signed_by(issuer, crl)]


def _signed_by(issuer: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    if name_key(crl.issuer) != name_key(issuer.subject):
        return False
    # A CRL only counts when its issuer really signed it.
    key = issuer.public_key()
    return isinstance(key, CertificateIssuerPublicKeyTypes) and crl.is_signature_valid(key)  # type: ignore[arg-type]


class CrlMark(Record):
    """A CRL's number in its sequence: `scope` names the sequence (issuer key and IssuingDistributionPoint, as
    RFC 5280 5.2.3 numbers CRLs per issuer and scope)."""

    scope: str
    number: int
    issuer: str


def crl_marks(store: TrustStore) -> list[CrlMark]:
    """The numbered CRLs whose issuer certificate is in the trust store (roots, intermediates) and signed them:
    what a CRL-number high-water mark can be kept for. Unnumbered CRLs, and CRLs of CAs that only travel in
    envelopes, have none."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    out: list[CrlMark] = []
    for crl in store.crls:
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            continue
        try:
            idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value.public_bytes()
        except x509.ExtensionNotFound:
            idp = b""
        for ca in (*store.roots, *store.intermediates):
            if _signed_by(ca, crl):
                spki = ca.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                out.append(CrlMark(hashlib.sha256(spki + b"\0" + idp).hexdigest(), number, subject_of(ca)))
                break
    return out


def _general_name_key(name: x509.GeneralName) -> object:
    if isinstance(name, x509.DirectoryName):
        return ("dir", name_key(name.value))
    return name


def _dp_names(dp: x509.DistributionPoint, issuer: x509.Name) -> list[x509.GeneralName]:
    if dp.full_name is not None:
        return list(dp.full_name)
    if dp.relative_name is not None:  # relative to the CRL issuer (RFC 5280 4.2.1.13)
        return [x509.DirectoryName(x509.Name([*issuer.rdns, dp.relative_name]))]
    return list(dp.crl_issuer or ())


def crl_covers(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> str | None:
    """None when `crl` is complete for `cert` (every reason, its kind of certificate, its distribution point);
    else why not. RFC 5280 6.3.3 (b), without delta or indirect CRLs (refused when loaded)."""
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None
    if idp.only_some_reasons:
        return "it covers only some revocation reasons"
    if idp.only_contains_attribute_certs:
        return "it covers only attribute certificates"
    if idp.only_contains_ca_certs and not is_ca(cert):
        return "it covers only CA certificates"
    if idp.only_contains_user_certs and is_ca(cert):
        return "it covers only end-entity certificates"
    if idp.full_name is None and idp.relative_name is None:
        return None
    scope = _dp_names(x509.DistributionPoint(idp.full_name, idp.relative_name, None, None), crl.issuer)
    wanted = {_general_name_key(n) for n in scope}
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return "it is a partition (issuing distribution point) and the certificate names no distribution point"
    for dp in dps:
        # A distribution point limited to some reasons is not where the certificate's complete status is.
        if dp.reasons is None and wanted & {_general_name_key(n) for n in _dp_names(dp, crl.issuer)}:
            return None
    return "it is the CRL of another partition (issuing distribution point)"


def check_revocation(chain: Sequence[x509.Certificate], store: TrustStore, now: dt.datetime) -> None:
    """Check every certificate below the root against its issuer's CRLs. Raises RevocationError.

    Every CRL of the issuer counts for "revoked" and "stale" (a serial is unique per issuer, so a listing in
    any of its CRLs is a revocation); only a complete CRL in the certificate's scope satisfies require_crl."""
    for cert, issuer in itertools.pairwise(chain):
        issuer_subject = subject_of(issuer)
        crls = _crls_by(issuer, store.crls)
        for crl in crls:
            last, nxt = _crl_time(crl)
            if nxt is None or now >= nxt or now < last:
                raise CrlStateError(
                    f"CRL from {issuer_subject!r} is stale (next update {nxt.isoformat() if nxt else 'unset'}): "
                    "install a fresh CRL"
                )
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise RevocationError(f"certificate {subject_of(cert)!r} is revoked by {issuer_subject!r}")
        if not store.requires_crl(issuer):
            continue
        if not crls:
            raise CrlStateError(f"no CRL from {issuer_subject!r} in the trust store, and the trust store requires one")
        gaps = [crl_covers(crl, cert) for crl in crls]
        if all(gaps):
            raise CrlStateError(
                f"no complete CRL from {issuer_subject!r} covers {subject_of(cert)!r} ({gaps[0]}), and the trust "
                "store requires one"
            )


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
