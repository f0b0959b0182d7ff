"""The trust core, one test per attack it stops, through `verify_files` — the function the hook and
`hostguard verify` call (tests/unit/verify_path.py; asserted by test_one_verification_path.py). Time pinned."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest

from hostguard.errors import (
    ChainError,
    DigestMismatchError,
    ExpiredError,
    FormatError,
    RevocationError,
    RollbackError,
    SignatureError,
    SignerPolicyError,
    VerificationError,
)
from hostguard.host.state import StateStore
from hostguard.host.verify_files import Outcome
from hostguard.signed.envelope import PAYLOAD_TYPE, parse_envelope
from hostguard.signed.policy import DEFAULT_POLICY, SignerPolicy, policy_from_toml
from hostguard.signed.trust import TrustStore
from tests.testbed.pki import DAY, NOW, TestPKI, issue
from tests.testbed.signed import disk_of, make_manifest, sign
from tests.unit import verify_path
from tests.unit.verify_path import digested

DISK = b"disk image bytes"


def store(pki: TestPKI, **kw: object) -> TrustStore:
    return TrustStore(roots=(pki.root.cert,), **kw)  # type: ignore[arg-type]


def good(pki: TestPKI, **manifest_kw: object) -> bytes:
    return sign(make_manifest(**manifest_kw), [(pki.leaf, [pki.intermediate])])  # type: ignore[arg-type]


def verify(
    env: bytes,
    pki: TestPKI,
    *,
    policy: SignerPolicy = DEFAULT_POLICY,
    now: dt.datetime = NOW,
    trust: TrustStore | None = None,
    state: StateStore | None = None,
    disks: list[bytes] | None = None,
) -> Outcome:
    given = None if disks is None else [digested(disk_of(d).sha256, len(d), f"disk{i}") for i, d in enumerate(disks)]
    return verify_path.verify(env, trust or store(pki), policy, now, state=state, disks=given)


def test_valid_envelope_is_allowed(pki: TestPKI, tmp_path: Path) -> None:
    with StateStore(tmp_path / "state") as state:
        result = verify(good(pki), pki, state=state, disks=[DISK])
        rows = state._run("SELECT valid_until FROM verdicts")
    assert (result.facts.name, result.facts.version) == ("web", 1)
    assert result.signer_subjects == ("O=hostguard tests,CN=acme-build",)
    assert "disk digest" in result.checks and "rollback" in result.checks
    assert rows and rows[0][0] <= pki.leaf.cert.not_valid_after_utc.timestamp()


def _mutate_payload(env: bytes, fn: object) -> bytes:
    doc = json.loads(env)
    payload = json.loads(base64.b64decode(doc["payload"]))
    fn(payload)  # type: ignore[operator]
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(doc).encode()


def test_tampered_payload_is_denied(pki: TestPKI) -> None:
    env = _mutate_payload(good(pki), lambda m: m["image"].update(version=99))
    with pytest.raises(SignatureError, match="does not match"):
        verify(env, pki)


def test_tampered_signature_is_denied(pki: TestPKI) -> None:
    doc = json.loads(good(pki))
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[-1] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SignatureError):
        verify(json.dumps(doc).encode(), pki)


def test_swapped_certificate_is_denied(pki: TestPKI) -> None:
    # A valid signature by one key presented with another (valid, trusted) signer's certificate.
    other = pki.leaf_variant("other-build")
    doc = json.loads(good(pki))
    doc["signatures"][0]["certificates"][0] = other.pem.decode()
    with pytest.raises(SignatureError, match="other-build"):
        verify(json.dumps(doc).encode(), pki)


def test_wrong_root_is_denied(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.unrelated_leaf(), [])])
    with pytest.raises(ChainError, match="does not chain to a trusted root"):
        verify(env, pki)


def test_expired_certificate_is_denied(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.expired_leaf(), [pki.intermediate])])
    with pytest.raises(ChainError, match="expired or not yet valid"):
        verify(env, pki)


def test_not_yet_valid_certificate_is_denied(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.not_yet_valid_leaf(), [pki.intermediate])])
    with pytest.raises(ChainError, match="expired or not yet valid"):
        verify(env, pki)


def test_server_auth_only_leaf_is_denied(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.server_auth_leaf(), [pki.intermediate])])
    with pytest.raises(ChainError, match="has no codeSigning EKU"):
        verify(env, pki)


def test_leaf_without_eku_is_denied(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.no_eku_leaf(), [pki.intermediate])])
    with pytest.raises(ChainError, match="no extended key usage"):
        verify(env, pki)


def test_ca_certificate_as_leaf_is_denied(pki: TestPKI) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_leaf = issue("ca-build", issuer=pki.intermediate, ca=True, path_length=0, key_cert_sign=True)
    # Give it codeSigning too, so only CA:TRUE can be what refuses it.
    ca_leaf = issue(
        "ca-build",
        issuer=pki.intermediate,
        ca=True,
        path_length=0,
        eku=(ExtendedKeyUsageOID.CODE_SIGNING,),
        key=ca_leaf.key,
    )
    env = sign(make_manifest(), [(ca_leaf, [pki.intermediate])])
    with pytest.raises(ChainError, match=r"is a CA certificate \(CA:TRUE\)"):
        verify(env, pki)


def test_leaf_planted_as_root_is_not_an_anchor(pki: TestPKI) -> None:
    # Only the loader refuses non-CA roots; even if one slipped in, the leaf must still chain to a CA root.
    env = good(pki)
    with pytest.raises(ChainError):
        verify(env, pki, trust=TrustStore(roots=(pki.leaf.cert,)))


def test_revoked_leaf_is_denied(pki: TestPKI) -> None:
    crl = pki.crl([pki.leaf.cert])
    with pytest.raises(RevocationError, match=r"acme-build.*is revoked"):
        verify(good(pki), pki, trust=store(pki, crls=(crl,)))


def test_stale_crl_is_denied(pki: TestPKI) -> None:
    crl = pki.crl([], last_update=NOW - 10 * DAY, next_update=NOW - DAY)
    with pytest.raises(RevocationError, match="stale"):
        verify(good(pki), pki, trust=store(pki, crls=(crl,)))


def test_crl_signed_by_someone_else_is_ignored(pki: TestPKI) -> None:
    from tests.testbed.pki import make_crl

    impostor = issue("hostguard test intermediate", ca=True)
    forged = make_crl(impostor, [])  # same issuer name, wrong key: must not satisfy a CRL requirement
    with pytest.raises(RevocationError, match="requires one"):
        verify(good(pki), pki, trust=store(pki, crls=(forged,), crl_required=frozenset({"*"})))


def test_missing_required_crl_is_denied(pki: TestPKI) -> None:
    required = frozenset({pki.intermediate.subject})
    with pytest.raises(RevocationError, match="requires one"):
        verify(good(pki), pki, trust=store(pki, crl_required=required))
    # ...and with a current CRL it passes.
    verify(good(pki), pki, trust=store(pki, crl_required=required, crls=(pki.crl(),)))


def test_expired_manifest_is_denied(pki: TestPKI) -> None:
    env = good(pki, created=NOW - 100 * DAY, expires=NOW - DAY)
    with pytest.raises(ExpiredError, match="expired"):
        verify(env, pki)


def test_manifest_from_the_future_is_denied(pki: TestPKI) -> None:
    env = good(pki, created=NOW + DAY, expires=NOW + 100 * DAY)
    with pytest.raises(ExpiredError, match="future"):
        verify(env, pki)


def test_rollback_to_an_older_version_is_denied(pki: TestPKI, tmp_path: Path) -> None:
    env = good(pki, version=3)
    with StateStore(tmp_path / "state") as state:
        state.record_version("web", 3)
        verify(env, pki, state=state)  # same version again is fine
        state.record_version("web", 4)
        with pytest.raises(RollbackError, match="older than version 4"):
            verify(env, pki, state=state)


def test_wrong_payload_type_is_denied(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.leaf, [pki.intermediate])], payload_type="application/vnd.in-toto+json")
    with pytest.raises(FormatError, match="payload type"):
        verify(env, pki)


def test_mix_and_match_with_another_image_is_denied(pki: TestPKI) -> None:
    env = good(pki)
    other = b"another image"
    with pytest.raises(DigestMismatchError, match=r"not a disk of web v1"):
        verify(env, pki, disks=[other])


def test_missing_disk_is_denied(pki: TestPKI) -> None:
    env = good(pki, disks=(disk_of(b"a"), disk_of(b"b")))
    with pytest.raises(DigestMismatchError, match="1 disk"):
        verify(env, pki, disks=[b"a"])


def test_duplicate_signatures_do_not_meet_a_threshold_of_two(pki: TestPKI) -> None:
    policy = policy_from_toml({"threshold": [{"images": "web*", "signers": 2}]})
    env = sign(make_manifest(), [(pki.leaf, [pki.intermediate]), (pki.leaf, [pki.intermediate])])
    with pytest.raises(SignerPolicyError, match="needs 2 distinct"):
        verify(env, pki, policy=policy)
    second = pki.leaf_variant("second-build")
    env2 = sign(make_manifest(), [(pki.leaf, [pki.intermediate]), (second, [pki.intermediate])])
    assert len(verify(env2, pki, policy=policy).signer_subjects) == 2


def test_same_key_in_two_certificates_counts_once(pki: TestPKI) -> None:
    policy = policy_from_toml({"threshold": [{"images": "*", "signers": 2}]})
    twin = issue("twin-build", issuer=pki.intermediate, key=pki.leaf.key)
    env = sign(make_manifest(), [(pki.leaf, [pki.intermediate]), (twin, [pki.intermediate])])
    with pytest.raises(SignerPolicyError):
        verify(env, pki, policy=policy)


def test_signer_not_allowed_for_image_name_is_denied(pki: TestPKI) -> None:
    policy = policy_from_toml({"signer": [{"cn": "acme-build", "images": ["db-*"]}]})
    with pytest.raises(SignerPolicyError, match="may not sign image 'web'"):
        verify(good(pki), pki, policy=policy)
    allowed = policy_from_toml({"signer": [{"cn": "acme-build", "root": pki.root.subject, "images": ["web"]}]})
    verify(good(pki), pki, policy=allowed)


def test_empty_signatures_are_denied(pki: TestPKI) -> None:
    doc = json.loads(good(pki))
    doc["signatures"] = []
    with pytest.raises(FormatError, match="no signatures"):
        verify(json.dumps(doc).encode(), pki)


def test_one_bad_signature_beside_a_good_one_is_ignored(pki: TestPKI) -> None:
    env = sign(make_manifest(), [(pki.unrelated_leaf(), []), (pki.leaf, [pki.intermediate])])
    assert verify(env, pki).signer_subjects == ("O=hostguard tests,CN=acme-build",)


def test_duplicate_json_keys_are_denied(pki: TestPKI) -> None:
    env = good(pki).replace(b'"payloadType"', b'"payloadType": "x", "payloadType"', 1)
    with pytest.raises(FormatError, match="duplicate JSON key"):
        verify(env, pki)


def test_duplicate_keys_inside_the_signed_manifest_are_denied(pki: TestPKI) -> None:
    payload = make_manifest().to_bytes().replace(b'"schema"', b'"schema": "x", "schema"', 1)
    env = sign(payload, [(pki.leaf, [pki.intermediate])])
    with pytest.raises(FormatError, match="duplicate JSON key"):
        verify(env, pki)


def test_nan_in_manifest_is_denied(pki: TestPKI) -> None:
    payload = make_manifest().to_bytes().replace(b'"version": 1', b'"version": NaN', 1)
    with pytest.raises(FormatError, match="NaN"):
        verify(sign(payload, [(pki.leaf, [pki.intermediate])]), pki)


def test_type_confusion_bool_version_is_denied(pki: TestPKI) -> None:
    payload = make_manifest().to_bytes().replace(b'"version": 1', b'"version": true', 1)
    with pytest.raises(FormatError, match=r"image\.version"):
        verify(sign(payload, [(pki.leaf, [pki.intermediate])]), pki)


def test_float_version_is_denied(pki: TestPKI) -> None:
    payload = make_manifest().to_bytes().replace(b'"version": 1', b'"version": 1.0', 1)
    with pytest.raises(FormatError):
        verify(sign(payload, [(pki.leaf, [pki.intermediate])]), pki)


def test_deep_nesting_is_denied(pki: TestPKI) -> None:
    env = b'{"payloadType": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(FormatError, match="nested deeper"):
        verify(env, pki)


def test_oversized_envelope_is_denied(pki: TestPKI) -> None:
    from hostguard.signed.envelope import MAX_ENVELOPE_BYTES

    with pytest.raises(FormatError, match="limit"):
        parse_envelope(b" " * (MAX_ENVELOPE_BYTES + 1))


def test_unknown_manifest_key_is_denied(pki: TestPKI) -> None:
    doc = make_manifest().to_json()
    doc["allow_everything"] = True
    with pytest.raises(FormatError, match="unknown key 'allow_everything'"):
        verify(sign(json.dumps(doc).encode(), [(pki.leaf, [pki.intermediate])]), pki)


@pytest.mark.parametrize("alphabet", ["std", "url", "std-nopad", "url-nopad"])
def test_all_dsse_base64_spellings_are_accepted(pki: TestPKI, alphabet: str) -> None:
    doc = json.loads(good(pki))
    for field_holder, key in [(doc, "payload"), (doc["signatures"][0], "sig")]:
        raw = base64.b64decode(field_holder[key])
        text = (base64.urlsafe_b64encode(raw) if alphabet.startswith("url") else base64.b64encode(raw)).decode()
        field_holder[key] = text.rstrip("=") if alphabet.endswith("nopad") else text
    verify(json.dumps(doc).encode(), pki)


@pytest.mark.parametrize("kind", ["p384", "rsa2048", "ed25519"])
def test_each_allowed_key_type_verifies(pki: TestPKI, kind: str) -> None:
    leaf = issue(f"{kind}-build", issuer=pki.intermediate, key_kind=kind)
    verify(sign(make_manifest(), [(leaf, [pki.intermediate])]), pki)


def test_small_rsa_key_is_denied(pki: TestPKI) -> None:
    from hostguard.signed.signing import PrivateKeySigner
    from tests.testbed.pki import new_key

    with pytest.raises(VerificationError, match="too small"):
        PrivateKeySigner(new_key("rsa1024"))


def test_payload_type_is_bound_by_the_signature(pki: TestPKI) -> None:
    doc = json.loads(good(pki))
    doc["payloadType"] = PAYLOAD_TYPE + "x"
    with pytest.raises(SignatureError):
        verify(json.dumps(doc).encode(), pki)


def test_non_canonical_certificate_encoding_is_denied(pki: TestPKI) -> None:
    # Found by the hypothesis property: setting the signature BIT STRING's unused-bits byte to 1 leaves a
    # certificate that parses and verifies. One certificate must have one accepted encoding.
    from cryptography.hazmat.primitives.serialization import Encoding

    # The parser only takes the mutation when the signature's last bit is 0 (the "unused" bit): pick such a leaf.
    leaf = next(c for c in (pki.leaf_variant("bitstring-build") for _ in range(64)) if c.cert.signature[-1] % 2 == 0)
    der = leaf.cert.public_bytes(Encoding.DER)
    sig = leaf.cert.signature
    at = len(der) - len(sig) - 1
    assert der[at] == 0
    mutated = der[:at] + b"\x01" + der[at + 1 :]
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(mutated) + b"-----END CERTIFICATE-----\n"
    doc = json.loads(sign(make_manifest(), [(leaf, [pki.intermediate])]))
    doc["signatures"][0]["certificates"][0] = pem.decode()
    with pytest.raises(FormatError, match="not canonical DER"):
        verify(json.dumps(doc).encode(), pki)


def test_a_malformed_certificate_beside_a_good_signature_neither_crashes_nor_widens_the_cache(
    pki: TestPKI, tmp_path: Path
) -> None:
    doc = json.loads(sign(make_manifest(), [(pki.leaf, [pki.intermediate]), (pki.leaf_variant("b"), [])]))
    junk = base64.encodebytes(b"\x30\x82\x01\x00" + bytes(256)).decode()
    doc["signatures"][1]["certificates"] = [f"-----BEGIN CERTIFICATE-----\n{junk}-----END CERTIFICATE-----\n"]
    with StateStore(tmp_path / "state") as state:
        assert verify(json.dumps(doc).encode(), pki, state=state).signer_subjects == (
            "O=hostguard tests,CN=acme-build",
        )
        (until,) = state._run("SELECT valid_until FROM verdicts")[0]
    assert until <= pki.leaf.cert.not_valid_after_utc.timestamp()
