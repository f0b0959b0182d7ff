"""Test PKI, generated at test time (no private key is ever committed).

`TestPKI` makes a root CA, an intermediate CA and a code-signing leaf, plus the bad variants the attack tests
need. `write_trust_dir` lays out a hostguard trust directory (roots/, intermediates/, crls/, signers.toml).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# Pinned per run (today, midnight UTC) so unit tests are deterministic within a run, and certificates made
# for integration tests are valid at the real current time.
NOW = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
DAY = dt.timedelta(days=1)


def new_key(kind: str = "p256") -> PrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclass
class Identity:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{stem}.crt.pem"
        key_path = directory / f"{stem}.key.pem"
        cert_path.write_bytes(self.pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def issue(
    cn: str,
    *,
    issuer: Identity | None = None,
    ca: bool = False,
    path_length: int | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CODE_SIGNING,),
    san: Iterable[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key: PrivateKey | None = None,
    key_kind: str = "p256",
    key_cert_sign: bool | None = None,
    subject: x509.Name | None = None,
    public_key: PublicKey | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    san_names: Sequence[x509.GeneralName] = (),
) -> Identity:
    """Issue a certificate. With no issuer it is self-signed.

    `subject`, `public_key` (a key the holder has no private half of, e.g. a weak one the CA certified anyway),
    `extensions` (added as given, with their criticality) and `san_names` (typed) build attackers' certificates."""
    key = key or new_key(key_kind)
    name = subject or x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostguard tests")]
    )
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.cert.subject if issuer else name
    subject_key = public_key or key.public_key()
    nb = not_before or NOW - 30 * DAY
    na = not_after or NOW + 365 * DAY
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    )
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    sign_certs = ca if key_cert_sign is None else key_cert_sign
    b = b.add_extension(
        x509.KeyUsage(
            digital_signature=not ca,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=sign_certs,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if not ca and eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(s) for s in san]
    sans += san_names
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    cert = b.sign(signer_key, _hash_for(signer_key))
    return Identity(cert, key)


def make_crl(
    issuer: Identity,
    revoked: Iterable[x509.Certificate] = (),
    *,
    last_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
    issuer_name: x509.Name | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    entry_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateRevocationList:
    """A CRL signed by `issuer`; `issuer_name` (default its subject), `extensions` and `entry_extensions` (on
    every entry) as given, for attackers' CRLs."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_name or issuer.cert.subject)
        .last_update(last_update or NOW - DAY)
        .next_update(next_update or NOW + 7 * DAY)
    )
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    for cert in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(NOW - DAY)
        for ext, critical in entry_extensions:
            entry = entry.add_extension(ext, critical=critical)
        b = b.add_revoked_certificate(entry.build())
    return b.sign(issuer.key, _hash_for(issuer.key))


@dataclass
class TestPKI:
    """Root -> intermediate -> code-signing leaf, and the bad variants."""

    __test__ = False  # not a pytest class

    root: Identity = field(init=False)
    intermediate: Identity = field(init=False)
    leaf: Identity = field(init=False)

    def __post_init__(self) -> None:
        self.root = issue("hostguard test root", ca=True, path_length=1, not_after=NOW + 3650 * DAY)
        self.intermediate = issue("hostguard test intermediate", issuer=self.root, ca=True, path_length=0)
        self.leaf = issue("acme-build", issuer=self.intermediate, san=["https://acme.example/build"])

    def leaf_variant(self, cn: str, **kwargs: object) -> Identity:
        return issue(cn, issuer=self.intermediate, **kwargs)  # type: ignore[arg-type]

    def expired_leaf(self) -> Identity:
        return self.leaf_variant("expired-build", not_before=NOW - 400 * DAY, not_after=NOW - DAY)

    def not_yet_valid_leaf(self) -> Identity:
        return self.leaf_variant("future-build", not_before=NOW + DAY, not_after=NOW + 400 * DAY)

    def server_auth_leaf(self) -> Identity:
        return self.leaf_variant("web-server", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))

    def no_eku_leaf(self) -> Identity:
        return self.leaf_variant("no-eku-build", eku=None)

    def ca_leaf(self) -> Identity:
        return self.leaf_variant("ca-build", ca=True, path_length=0)

    def unrelated_leaf(self) -> Identity:
        other_root = issue("unrelated root", ca=True, path_length=1)
        return issue("acme-build", issuer=other_root)

    def crl(
        self,
        revoked: Iterable[x509.Certificate] = (),
        *,
        last_update: dt.datetime | None = None,
        next_update: dt.datetime | None = None,
    ) -> x509.CertificateRevocationList:
        return make_crl(self.intermediate, revoked, last_update=last_update, next_update=next_update)

    def write_trust_dir(
        self,
        directory: Path,
        *,
        crls: Iterable[x509.CertificateRevocationList] = (),
        signers_toml: str | None = None,
        with_intermediate: bool = False,
    ) -> Path:
        (directory / "roots").mkdir(parents=True, exist_ok=True)
        (directory / "roots" / "root.pem").write_bytes(self.root.pem)
        if with_intermediate:
            (directory / "intermediates").mkdir(exist_ok=True)
            (directory / "intermediates" / "intermediate.pem").write_bytes(self.intermediate.pem)
        crl_list = list(crls)
        if crl_list:
            (directory / "crls").mkdir(exist_ok=True)
            for i, crl in enumerate(crl_list):
                (directory / "crls" / f"crl{i}.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        if signers_toml is not None:
            (directory / "signers.toml").write_text(signers_toml)
        return directory
