"""Attacks on the trust core (issue 22), each through `hostguard verify`'s real path: the CLI's `main`, which
calls host/verify_files.verify_files like the hook and the library. Every attacker PKI is built here with
`cryptography`; each test asserts the exit status and the one line the admin reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostguard.cli import main
from hostguard.signed.envelope import PAYLOAD_TYPE, Envelope, Signature
from tests.testbed.pki import DAY, NOW, Identity, TestPKI, issue, make_crl
from tests.testbed.signed import make_manifest, sign

AT = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
EKU = ExtendedKeyUsageOID


class Host:
    """A trust directory and envelopes in a temporary directory, verified through the CLI."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.trust = tmp / "trust"

    def trust_dir(
        self,
        roots: Sequence[Identity],
        *,
        intermediates: Sequence[Identity] = (),
        crls: Sequence[x509.CertificateRevocationList | bytes] = (),
        signers_toml: str | None = None,
    ) -> Path:
        for sub in ("roots", "intermediates", "crls"):
            (self.trust / sub).mkdir(parents=True, exist_ok=True)
            for old in (self.trust / sub).iterdir():
                old.unlink()
        for i, root in enumerate(roots):
            (self.trust / "roots" / f"root{i}.pem").write_bytes(root.pem)
        for i, inter in enumerate(intermediates):
            (self.trust / "intermediates" / f"inter{i}.pem").write_bytes(inter.pem)
        for i, crl in enumerate(crls):
            data = crl if isinstance(crl, bytes) else crl.public_bytes(Encoding.PEM)
            (self.trust / "crls" / f"crl{i}.pem").write_bytes(data)
        (self.trust / "signers.toml").unlink(missing_ok=True)
        if signers_toml is not None:
            (self.trust / "signers.toml").write_text(signers_toml)
        return self.trust

    def verify(self, envelope: bytes, *, state: bool = False) -> tuple[int, str]:
        """Exit status and stderr of `hostguard verify` (stderr must be exactly one line)."""
        path = self.tmp / "image.hgsig"
        path.write_bytes(envelope)
        self.capsys.readouterr()
        extra = ["--state", str(self.tmp / "state")] if state else []
        rc = main(["verify", str(path), "--trust", str(self.trust), "--at", AT, *extra])
        err = self.capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return rc, err.rstrip("\n")


@pytest.fixture
def host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Host:
    return Host(tmp_path, capsys)


def envelope(leaf: Identity, *chain: Identity, name: str = "web") -> bytes:
    return sign(make_manifest(name=name), [(leaf, list(chain))])


def ca(cn: str, issuer: Identity | None, *, path_length: int = 0, **kw: object) -> Identity:
    return issue(cn, issuer=issuer, ca=True, path_length=path_length, **kw)  # type: ignore[arg-type]


def eku(*oids: x509.ObjectIdentifier) -> list[tuple[x509.ExtensionType, bool]]:
    return [(x509.ExtendedKeyUsage(list(oids)), False)]


# --- 1. The EKU of a CA is read for code signing, not TLS client auth ----------------------------------------


def test_sub_ca_limited_to_client_auth_cannot_issue_code_signing_leaves(host: Host, pki: TestPKI) -> None:
    tls_ca = ca("tls client ca", pki.root, extensions=eku(EKU.CLIENT_AUTH))
    host.trust_dir([pki.root])
    rc, line = host.verify(envelope(issue("acme-build", issuer=tls_ca), tls_ca))
    assert rc == 1
    assert "does not chain to a trusted root" in line
    assert "'O=hostguard tests,CN=tls client ca' is limited by its extended key usage" in line


def test_root_limited_to_client_auth_cannot_anchor_code_signing(host: Host) -> None:
    root = ca("tls root", None, path_length=1, extensions=eku(EKU.CLIENT_AUTH))
    inter = ca("inter", root)
    host.trust_dir([root])
    rc, line = host.verify(envelope(issue("acme-build", issuer=inter), inter))
    assert (rc, "tls root' is limited by its extended key usage" in line) == (1, True), line


@pytest.mark.parametrize("purpose", [EKU.CODE_SIGNING, EKU.ANY_EXTENDED_KEY_USAGE])
def test_ca_limited_to_code_signing_may_issue(host: Host, pki: TestPKI, purpose: x509.ObjectIdentifier) -> None:
    # The false deny: a CA correctly limited to codeSigning (or any purpose), as root and as intermediate.
    root = ca("signing root", None, path_length=1, extensions=eku(purpose))
    inter = ca("signing ca", root, extensions=eku(purpose, EKU.EMAIL_PROTECTION))
    host.trust_dir([root])
    rc, line = host.verify(envelope(issue("acme-build", issuer=inter), inter))
    assert rc == 0, line
    assert line.startswith("allowed: web v1 signed by O=hostguard tests,CN=acme-build")


# --- 3. require_crl is met only by a complete CRL in the certificate's scope ---------------------------------


def _idp(**kw: object) -> list[tuple[x509.ExtensionType, bool]]:
    args: dict[str, object] = {
        "full_name": None,
        "relative_name": None,
        "only_contains_user_certs": False,
        "only_contains_ca_certs": False,
        "only_some_reasons": None,
        "indirect_crl": False,
        "only_contains_attribute_certs": False,
    }
    args.update(kw)
    return [(x509.IssuingDistributionPoint(**args), True)]  # type: ignore[arg-type]


def _cdp(uri: str) -> list[tuple[x509.ExtensionType, bool]]:
    point = x509.DistributionPoint([x509.UniformResourceIdentifier(uri)], None, None, None)
    return [(x509.CRLDistributionPoints([point]), False)]


REQUIRE_CRL = '[revocation]\nrequire_crl = ["CN=hostguard test intermediate,O=hostguard tests"]\n'


@pytest.mark.parametrize(
    ("scope", "why"),
    [
        ({"only_contains_ca_certs": True}, "it covers only CA certificates"),
        ({"only_some_reasons": frozenset({x509.ReasonFlags.key_compromise})}, "only some revocation reasons"),
        ({"full_name": [x509.UniformResourceIdentifier("http://crl.example/part2")]}, "another partition"),
    ],
    ids=["ca-only", "reasons-partition", "other-partition"],
)
def test_out_of_scope_crl_does_not_satisfy_require_crl(
    host: Host, pki: TestPKI, scope: dict[str, object], why: str
) -> None:
    leaf = pki.leaf_variant("partitioned-build", extensions=_cdp("http://crl.example/part1"))
    revoked_elsewhere = make_crl(pki.intermediate, [], extensions=_idp(**scope))
    host.trust_dir([pki.root], crls=[revoked_elsewhere], signers_toml=REQUIRE_CRL)
    rc, line = host.verify(envelope(leaf, pki.intermediate))
    assert rc == 1
    assert line.startswith(
        "denied: revocation: no complete CRL from 'O=hostguard tests,CN=hostguard test intermediate'"
    )
    assert why in line and "requires one" in line


def test_partition_crl_of_the_certificates_own_distribution_point_counts(host: Host, pki: TestPKI) -> None:
    leaf = pki.leaf_variant("partitioned-build", extensions=_cdp("http://crl.example/part1"))
    part1 = [x509.UniformResourceIdentifier("http://crl.example/part1")]
    host.trust_dir(
        [pki.root], crls=[make_crl(pki.intermediate, [], extensions=_idp(full_name=part1))], signers_toml=REQUIRE_CRL
    )
    assert host.verify(envelope(leaf, pki.intermediate))[0] == 0
    host.trust_dir(
        [pki.root],
        crls=[make_crl(pki.intermediate, [leaf.cert], extensions=_idp(full_name=part1))],
        signers_toml=REQUIRE_CRL,
    )
    assert host.verify(envelope(leaf, pki.intermediate)) == (
        1,
        "denied: revocation: certificate 'O=hostguard tests,CN=partitioned-build' is revoked by "
        "'O=hostguard tests,CN=hostguard test intermediate'",
    )


def test_partition_named_relative_to_the_issuer_matches_the_same_full_name(host: Host, pki: TestPKI) -> None:
    # RFC 5280: a relative distribution point name is the CRL issuer's name plus one RDN; the certificate may
    # spell the same point as a full directoryName.
    rdn = x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Part 1")])
    full = x509.DirectoryName(x509.Name([*pki.intermediate.cert.subject.rdns, rdn]))
    cdp = x509.CRLDistributionPoints([x509.DistributionPoint([full], None, None, None)])
    leaf = pki.leaf_variant("relative-build", extensions=[(cdp, False)])
    for part, ok in (
        (rdn, True),
        (x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Part 2")]), False),
    ):
        crl = make_crl(pki.intermediate, [], extensions=_idp(relative_name=part))
        host.trust_dir([pki.root], crls=[crl], signers_toml=REQUIRE_CRL)
        rc, line = host.verify(envelope(leaf, pki.intermediate))
        assert (rc == 0) is ok, line


def test_revocation_listed_in_an_out_of_scope_crl_still_revokes(host: Host, pki: TestPKI) -> None:
    # A serial is unique per issuer: the issuer listing it anywhere is a revocation.
    ca_only = make_crl(pki.intermediate, [pki.leaf.cert], extensions=_idp(only_contains_ca_certs=True))
    host.trust_dir([pki.root], crls=[ca_only, pki.crl()], signers_toml=REQUIRE_CRL)
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 1 and "'O=hostguard tests,CN=acme-build' is revoked" in line


@pytest.mark.parametrize(
    ("extensions", "entry_extensions", "why"),
    [
        ([(x509.DeltaCRLIndicator(1), True)], [], "is a delta CRL"),
        (
            [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)],
            [],
            "critical extension hostguard does not know (1.3.6.1.4.1.99999.1)",
        ),
        (_idp(indirect_crl=True), [], "is an indirect CRL"),
        (
            [],
            [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.2"), b"\x05\x00"), True)],
            "has a critical extension hostguard does not know (1.3.6.1.4.1.99999.2)",
        ),
    ],
    ids=["delta", "unknown-critical", "indirect", "unknown-critical-entry"],
)
def test_unusable_crl_is_refused_not_taken_as_the_crl(
    host: Host,
    pki: TestPKI,
    extensions: list[tuple[x509.ExtensionType, bool]],
    entry_extensions: list[tuple[x509.ExtensionType, bool]],
    why: str,
) -> None:
    other = pki.leaf_variant("someone-else")
    crl = make_crl(pki.intermediate, [other.cert], extensions=extensions, entry_extensions=entry_extensions)
    host.trust_dir([pki.root], crls=[crl], signers_toml=REQUIRE_CRL)
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 2
    assert line.startswith("error: trust directory: ") and why in line


# --- 4. CRL issuer names compare as RFC 5280 says; the CRL is the one the issuer's key signed ----------------


def test_revoking_crl_with_issuer_name_in_another_case_still_revokes(host: Host, pki: TestPKI) -> None:
    shouting = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "HOSTGUARD  Test Intermediate "),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hostguard Tests", x509.name._ASN1Type.PrintableString),
        ]
    )
    crl = make_crl(pki.intermediate, [pki.leaf.cert], issuer_name=shouting)
    host.trust_dir([pki.root], crls=[crl])
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 1 and "is revoked by 'O=hostguard tests,CN=hostguard test intermediate'" in line


def test_crl_under_the_issuers_name_but_another_key_is_ignored(host: Host, pki: TestPKI) -> None:
    impostor = ca("hostguard test intermediate", None)
    forged = make_crl(impostor, [], issuer_name=pki.intermediate.cert.subject)
    host.trust_dir([pki.root], crls=[forged], signers_toml=REQUIRE_CRL)
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 1 and "no CRL from 'O=hostguard tests,CN=hostguard test intermediate'" in line


# --- 5. require_crl entries are parsed names, and must name a CA the trust directory knows -------------------


@pytest.mark.parametrize(
    "entry",
    [
        "CN=hostguard test intermediate,O=hostguard tests",  # certificate order (openssl)
        "O=hostguard tests,CN=hostguard test intermediate",  # RFC 4514 order
        "CN=Hostguard Test  Intermediate, O=hostguard tests",  # spaces, case
        "cn=hostguard test intermediate, o=hostguard tests",  # attribute names in lower case
    ],
)
def test_require_crl_entry_in_any_spelling_applies(host: Host, pki: TestPKI, entry: str) -> None:
    toml = f'[revocation]\nrequire_crl = ["{entry}"]\n'
    host.trust_dir([pki.root], intermediates=[pki.intermediate], signers_toml=toml)
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert (rc, "requires one" in line) == (1, True), line
    host.trust_dir([pki.root], intermediates=[pki.intermediate], crls=[pki.crl()], signers_toml=toml)
    assert host.verify(envelope(pki.leaf, pki.intermediate))[0] == 0


@pytest.mark.parametrize("entry", ["CN=hostguard test intermediate", "CN=Acme Issuing CA", "O=hostguard tests"])
def test_require_crl_entry_naming_no_configured_ca_is_a_configuration_error(
    host: Host, pki: TestPKI, entry: str
) -> None:
    host.trust_dir(
        [pki.root], intermediates=[pki.intermediate], signers_toml=f'[revocation]\nrequire_crl = ["{entry}"]\n'
    )
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 2
    assert line == (
        f"error: signers.toml: require_crl entry {entry!r} names no root, intermediate or CRL issuer in the "
        "trust directory"
    )


def test_require_crl_entry_that_is_not_a_name_is_a_configuration_error(host: Host, pki: TestPKI) -> None:
    host.trust_dir([pki.root], signers_toml='[revocation]\nrequire_crl = ["hostguard test intermediate"]\n')
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert (rc, "is not a distinguished name" in line) == (2, True), line


def test_require_crl_names_the_issuer_through_its_crl_alone(host: Host, pki: TestPKI) -> None:
    # The intermediate travels in envelopes only; its CRL in crls/ is what makes the entry name a known CA.
    toml = '[revocation]\nrequire_crl = ["CN=hostguard test intermediate,O=hostguard tests"]\n'
    host.trust_dir([pki.root], crls=[pki.crl([pki.leaf.cert])], signers_toml=toml)
    assert host.verify(envelope(pki.leaf, pki.intermediate))[0] == 1


# --- 6. An empty signer list is not "anyone may sign anything" -----------------------------------------------


@pytest.mark.parametrize(
    "toml", ["signer = []\n", "signer = {}\n", "signer = []\n[[threshold]]\nimages = '*'\nsigners = 1\n"]
)
def test_empty_signer_list_is_a_configuration_error(host: Host, pki: TestPKI, toml: str) -> None:
    host.trust_dir([pki.root], signers_toml=toml)
    assert host.verify(envelope(pki.leaf, pki.intermediate)) == (
        2,
        "error: signers.toml: signer must be a non-empty array of tables ([[signer]])",
    )


@pytest.mark.parametrize(
    ("toml", "why"),
    [
        ("", "signers.toml is empty: remove it for the default policy, or add [[signer]] rules"),
        ("[[signer]]\nimages = ['*']\n", "signer policy: an AllOf with no conditions would match every signer"),
        ("[[signer]]\ncn = []\nimages = ['*']\n", "signers.toml: cn must be a non-empty string or list of strings"),
    ],
    ids=["empty-file", "no-conditions", "empty-cn-list"],
)
def test_other_match_everything_policies_are_configuration_errors(
    host: Host, pki: TestPKI, toml: str, why: str
) -> None:
    host.trust_dir([pki.root], signers_toml=toml)
    assert host.verify(envelope(pki.leaf, pki.intermediate)) == (2, f"error: {why}")


# --- 9. Weak keys are refused whatever the CA certified -------------------------------------------------------


def _forged(payload_leaf: Identity, sig: bytes, *chain: Identity) -> bytes:
    env = Envelope(PAYLOAD_TYPE, make_manifest().to_bytes(), ())
    certs = tuple(i.cert.public_bytes(Encoding.PEM) for i in (payload_leaf, *chain))
    return env.with_signature(Signature("", sig, certs)).to_bytes()


def test_small_order_ed25519_key_with_a_universal_signature_is_refused(host: Host, pki: TestPKI) -> None:
    identity_point = ed25519.Ed25519PublicKey.from_public_bytes(b"\x01" + bytes(31))
    # R = the identity, S = 0: OpenSSL accepts this "signature" of every message under this key.
    universal = b"\x01" + bytes(63)
    identity_point.verify(universal, b"any manifest at all")
    leaf = pki.leaf_variant("small-order-build", public_key=identity_point)
    host.trust_dir([pki.root])
    assert host.verify(_forged(leaf, universal, pki.intermediate)) == (
        1,
        "denied: signature: Ed25519 public key is of small order (or not a canonical point) "
        "(leaf 'O=hostguard tests,CN=small-order-build')",
    )


def _rsa_signed(leaf: Identity, *chain: Identity) -> bytes:
    env = Envelope(PAYLOAD_TYPE, make_manifest().to_bytes(), ())
    assert isinstance(leaf.key, rsa.RSAPrivateKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    return _forged(leaf, leaf.key.sign(env.pae(), pss, hashes.SHA256()), *chain)


@pytest.mark.parametrize(
    ("exponent", "bits", "why"),
    [
        (3, 2048, "RSA public exponent 3 is not 65537"),
        (65537, 1024, "RSA key of 1024 bits is too small (need >= 2048)"),
    ],
)
def test_weak_rsa_leaf_key_is_refused(host: Host, pki: TestPKI, exponent: int, bits: int, why: str) -> None:
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    leaf = pki.leaf_variant("weak-rsa-build", key=key)
    host.trust_dir([pki.root])
    rc, line = host.verify(_rsa_signed(leaf, pki.intermediate))
    assert (rc, line) == (1, f"denied: signature: {why} (leaf 'O=hostguard tests,CN=weak-rsa-build')")


def test_ca_with_unusual_rsa_exponent_is_refused(host: Host, pki: TestPKI) -> None:
    inter = ca("e3 ca", pki.root, key=rsa.generate_private_key(public_exponent=3, key_size=2048))
    host.trust_dir([pki.root])
    rc, line = host.verify(envelope(issue("acme-build", issuer=inter), inter))
    assert (rc, line) == (
        1,
        "denied: certificate chain: CA 'O=hostguard tests,CN=e3 ca': RSA public exponent 3 is not 65537",
    )


# --- 12. One line, not a traceback ----------------------------------------------------------------------------


def test_non_utf8_file_name_in_roots_is_one_line(host: Host, pki: TestPKI) -> None:
    host.trust_dir([pki.root])
    (host.trust / "roots").joinpath(b"\xff\x1b[2J.pem".decode("utf-8", "surrogateescape")).write_bytes(pki.root.pem)
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 2
    assert line.endswith(r"roots: file name '\udcff\x1b[2J.pem' is not printable UTF-8")


def test_crl_with_version_33_is_one_line(host: Host, pki: TestPKI) -> None:
    der = pki.crl().public_bytes(Encoding.DER)
    at = der.index(b"\x02\x01\x01")  # TBSCertList.version, v2
    bad = der[:at] + b"\x02\x01\x21" + der[at + 3 :]
    host.trust_dir([pki.root], crls=[bad])
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 2
    assert line.endswith("crls/crl0.pem is not a CRL: 33 is not a valid CRL version")


# --- 13. Untrusted text is escaped wherever it is printed ------------------------------------------------------


HOSTILE = "evil\x1b[2K\r\x07 verdict=allow\u202e"


def _hostile_subject() -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTILE)])


def test_control_characters_in_a_denied_subject_are_escaped(host: Host, pki: TestPKI) -> None:
    stranger_root = ca("stranger root", None, path_length=1)
    leaf = issue("x", issuer=stranger_root, subject=_hostile_subject())
    host.trust_dir([pki.root])
    rc, line = host.verify(envelope(leaf))
    assert rc == 1
    assert line == (
        r"denied: certificate chain: leaf 'CN=evil\x1b[2K\r\x07 verdict=allow\u202e' does not chain to a trusted root"
    )
    assert line.isprintable()


def test_control_characters_in_an_allowed_subject_are_escaped(host: Host, pki: TestPKI) -> None:
    host.trust_dir([pki.root])
    rc, line = host.verify(envelope(pki.leaf_variant("x", subject=_hostile_subject()), pki.intermediate))
    assert (rc, line) == (0, r"allowed: web v1 signed by CN=evil\x1b[2K \x07 verdict=allow\u202e")


def test_syslog_line_cannot_carry_a_fake_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import syslog

    from hostguard.host.audit import write_audit

    sent: list[str] = []
    monkeypatch.setattr(syslog, "syslog", lambda _level, line: sent.append(line))
    write_audit(tmp_path / "audit.jsonl", {"verdict": "deny", "reason": "leaf 'CN=x verdict=allow\x1b'"})
    assert sent == [r'verdict=deny reason="leaf \u0027CN=x verdict=allow\u001b\u0027"'.replace(r"\u0027", "'")]
    assert json.loads((tmp_path / "audit.jsonl").read_text())["reason"] == "leaf 'CN=x verdict=allow\x1b'"


# --- 15. At most 8 certificates per signature, however they are packed ----------------------------------------


def test_certificate_limit_cannot_be_bypassed_with_concatenated_pem(host: Host, pki: TestPKI) -> None:
    doc = json.loads(envelope(pki.leaf, pki.intermediate))
    doc["signatures"][0]["certificates"][1] = pki.intermediate.pem.decode() * 9
    host.trust_dir([pki.root])
    assert host.verify(json.dumps(doc).encode()) == (
        1,
        "denied: format: envelope signatures[0].certificates[1] must hold exactly one PEM certificate",
    )


# --- Design list (ADR 0006) -------------------------------------------------------------------------------------


def test_one_party_with_two_keys_does_not_meet_a_threshold_of_two(host: Host, pki: TestPKI) -> None:
    second_key = pki.leaf_variant("acme-build")  # same subject, new key: the same party
    payload = make_manifest()
    env = sign(payload, [(pki.leaf, [pki.intermediate]), (second_key, [pki.intermediate])])
    host.trust_dir([pki.root], signers_toml="[[threshold]]\nimages = '*'\nsigners = 2\n")
    assert host.verify(env) == (
        1,
        "denied: signer policy: image 'web' needs 2 distinct authorized signer(s), found 1",
    )
    other = pki.leaf_variant("second-build")
    assert host.verify(sign(payload, [(pki.leaf, [pki.intermediate]), (other, [pki.intermediate])]))[0] == 0


def test_dns_san_does_not_match_a_uri_identity(host: Host, pki: TestPKI) -> None:
    dns_leaf = pki.leaf_variant("dns-build", san=[], san_names=[x509.DNSName("https://acme.example/build")])
    host.trust_dir([pki.root], signers_toml='[[signer]]\nsan = "https://acme.example/build"\nimages = ["*"]\n')
    rc, line = host.verify(envelope(dns_leaf, pki.intermediate))
    assert (rc, line) == (1, "denied: signer policy: signer 'O=hostguard tests,CN=dns-build' may not sign image 'web'")
    assert host.verify(envelope(pki.leaf, pki.intermediate))[0] == 0
    mail_leaf = pki.leaf_variant("mail-build", san_names=[x509.RFC822Name("build@acme.example")])
    host.trust_dir([pki.root], signers_toml='[[signer]]\nemail = "build@acme.example"\nimages = ["*"]\n')
    assert host.verify(envelope(mail_leaf, pki.intermediate))[0] == 0


def test_subject_with_two_common_names_is_refused(host: Host, pki: TestPKI) -> None:
    two = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "evil-build"), x509.NameAttribute(NameOID.COMMON_NAME, "acme-build")]
    )
    host.trust_dir([pki.root], signers_toml='[[signer]]\ncn = "acme-build"\nimages = ["*"]\n')
    rc, line = host.verify(envelope(pki.leaf_variant("x", subject=two), pki.intermediate))
    assert (rc, line) == (
        1,
        "denied: certificate chain: leaf 'CN=acme-build,CN=evil-build' has 2 common names; a signer has at most one",
    )


def test_root_pin_by_subject_is_not_met_by_another_root_with_that_subject(host: Host, pki: TestPKI) -> None:
    twin_root = ca("hostguard test root", None, path_length=1)  # same subject, attacker's key
    twin_inter = ca("hostguard test intermediate", twin_root)
    forged = envelope(issue("acme-build", issuer=twin_inter), twin_inter)
    by_subject = f'[[signer]]\ncn = "acme-build"\nroot = "{pki.root.subject}"\nimages = ["*"]\n'
    host.trust_dir([pki.root, twin_root], signers_toml=by_subject)
    rc, line = host.verify(forged)
    assert rc == 2 and "names 2 certificates in roots/; pin one by its fingerprint (sha256:" in line
    from hostguard.signed.trust import fingerprint

    by_print = by_subject.replace(pki.root.subject, fingerprint(pki.root.cert))
    host.trust_dir([pki.root, twin_root], signers_toml=by_print)
    assert host.verify(forged) == (
        1,
        "denied: signer policy: signer 'O=hostguard tests,CN=acme-build' may not sign image 'web'",
    )
    assert host.verify(envelope(pki.leaf, pki.intermediate))[0] == 0
    host.trust_dir([pki.root], signers_toml=by_subject.replace("hostguard test root", "another root"))
    assert host.verify(forged)[1].endswith("names no certificate in roots/")


def test_expired_crl_of_a_limited_scope_still_denies(host: Host, pki: TestPKI) -> None:
    # Staleness is judged over every CRL of the issuer, as before: scope does not make a stale CRL harmless.
    stale = make_crl(
        pki.intermediate,
        [],
        last_update=NOW - 9 * DAY,
        next_update=NOW - DAY,
        extensions=_idp(only_contains_ca_certs=True),
    )
    host.trust_dir([pki.root], crls=[stale, pki.crl()])
    rc, line = host.verify(envelope(pki.leaf, pki.intermediate))
    assert rc == 1 and "is stale" in line


def _numbered_crl(
    pki: TestPKI, number: int, revoked: Sequence[x509.Certificate] = ()
) -> x509.CertificateRevocationList:
    return make_crl(pki.intermediate, revoked, extensions=[(x509.CRLNumber(number), False)])


def test_older_genuine_crl_cannot_un_revoke_a_leaf(host: Host, pki: TestPKI) -> None:
    # The CRL-number high-water mark: CRL 7 revoked the leaf; CRL 6 (genuine, before its nextUpdate) comes back.
    env = envelope(pki.leaf, pki.intermediate)
    old, new = _numbered_crl(pki, 6), _numbered_crl(pki, 7, [pki.leaf.cert])
    host.trust_dir([pki.root], intermediates=[pki.intermediate], crls=[old])
    assert host.verify(env, state=True)[0] == 0  # cached verdict stored under the trust store with CRL 6
    host.trust_dir([pki.root], intermediates=[pki.intermediate], crls=[new])
    assert "is revoked" in host.verify(env, state=True)[1]
    host.trust_dir([pki.root], intermediates=[pki.intermediate], crls=[old])  # the rollback: same bytes as before
    rc, line = host.verify(env, state=True)
    assert rc == 1
    assert line.startswith(f"denied: revocation: a CRL in {host.trust}/crls (restored) is older than one already used")
    host.trust_dir([pki.root], intermediates=[pki.intermediate], crls=[_numbered_crl(pki, 5)])  # never seen
    rc, line = host.verify(env, state=True)
    assert (
        rc,
        "(number 5 from 'O=hostguard tests,CN=hostguard test intermediate') is older than number 7" in line,
    ) == (
        1,
        True,
    ), line
    # Old and new side by side: the newest counts, and the old one only adds revocations.
    host.trust_dir([pki.root], intermediates=[pki.intermediate], crls=[old, _numbered_crl(pki, 8)])
    assert host.verify(env, state=True)[0] == 0


def test_hostile_subject_is_escaped_in_the_hook_deny_line_and_audit_log(tmp_path: Path, pki: TestPKI) -> None:
    # The installed hook's path: a subprocess reading the configuration, deciding, auditing, printing one line.
    import os
    import subprocess
    import sys

    from hostguard.signed.envelope import parse_envelope
    from tests.unit.test_preboot import Host as PrebootHost

    pre = PrebootHost(tmp_path, pki)
    signed = Path(f"{pre.base}.hgsig")
    hostile = issue("x", issuer=ca("stranger root", None, path_length=1), subject=_hostile_subject())
    signed.write_bytes(sign(parse_envelope(signed.read_bytes()).payload, [(hostile, [])]))
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "hostguard.toml"
    config.write_text(
        f'[trust]\ndir = "{pre.trust}"\n[state]\ndir = "{pre.state}"\n[audit]\nlog = "{audit}"\nsyslog = false\n'
    )
    env = {**os.environ, "HOSTGUARD_CONFIG": str(config), "HOSTGUARD_HOOK_LOG": str(tmp_path / "hook.log")}
    run = "import sys; from hostguard.hook import run; run(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", run, "web1", "prepare", "begin", "-"],
        input=pre.xml(pre.overlay()),
        capture_output=True,
        env=env,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode("ascii") == (
        r"hostguard: denied web1: certificate chain: leaf 'CN=evil\x1b[2K\r\x07 verdict=allow\u202e' does not "
        "chain to a trusted root\n"
    )
    record = json.loads(audit.read_text())
    assert record["verdict"] == "deny" and HOSTILE not in record["reason"] and r"\x1b[2K" in record["reason"]


def _torsion_points() -> set[bytes]:
    """The 8 points of small order, computed (not copied): [l]Q for points Q until 8 distinct ones appear."""
    import hashlib

    from hostguard.signed.signing import _D, _P, _SQRT_M1, _ed25519_add

    order = 2**252 + 27742317777372353535851937790883648493

    def times(point: tuple[int, int], k: int) -> tuple[int, int]:
        acc = (0, 1)
        while k:
            if k & 1:
                acc = _ed25519_add(acc, point)
            point, k = _ed25519_add(point, point), k >> 1
        return acc

    found: set[bytes] = set()
    seed = 0
    while len(found) < 8:
        seed += 1
        raw = hashlib.sha256(b"%d" % seed).digest()
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            continue
        y = int.from_bytes(key.public_bytes_raw(), "little") & ((1 << 255) - 1)
        if y >= _P:
            continue
        # Recover x as the check does; points off the curve are skipped.
        x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
        x = pow(x2, (_P + 3) // 8, _P)
        if (x * x - x2) % _P:
            x = x * _SQRT_M1 % _P
        if (x * x - x2) % _P:
            continue
        tx, ty = times((x, y), order)
        found.add((ty | ((tx & 1) << 255)).to_bytes(32, "little"))
    return found


def test_every_small_order_ed25519_point_is_refused_and_real_keys_are_not() -> None:
    from hostguard.signed.signing import ed25519_small_order

    torsion = _torsion_points()
    assert len(torsion) == 8 and b"\x01" + bytes(31) in torsion
    assert all(ed25519_small_order(p) for p in torsion)
    # libsodium's blocklist, with the sign bit set as well, and y >= p (non-canonical).
    sodium = [
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ]
    for text in sodium:
        raw = bytes.fromhex(text)
        assert ed25519_small_order(raw) and ed25519_small_order(raw[:31] + bytes([raw[31] | 0x80]))
    for _ in range(64):
        assert not ed25519_small_order(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw())
