"""Property: no byte mutation of a valid envelope, manifest or certificate is ever allowed, and no input makes
verification crash (anything but a hostguard error) or hang. Through `verify_files`, the hook's and CLI's path."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import HostguardError
from hostguard.signed.envelope import parse_envelope
from hostguard.signed.policy import DEFAULT_POLICY
from hostguard.signed.trust import TrustStore
from tests.testbed.pki import NOW, TestPKI
from tests.testbed.signed import make_manifest, sign
from tests.unit.verify_path import verify

PKI = TestPKI()
STORE = TrustStore(roots=(PKI.root.cert,))
ENVELOPE = sign(make_manifest(), [(PKI.leaf, [PKI.intermediate])])
DOC = json.loads(ENVELOPE)
PAYLOAD = base64.b64decode(DOC["payload"])
LEAF_PEM = DOC["signatures"][0]["certificates"][0].encode()
BASELINE = verify(ENVELOPE, STORE, DEFAULT_POLICY, NOW)

SETTINGS = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _denied(envelope: bytes) -> bool:
    try:
        verify(envelope, STORE, DEFAULT_POLICY, NOW)
    except HostguardError:
        return True
    return False


def _mutate(data: bytes, index: int, value: int) -> bytes:
    index %= len(data)
    if data[index] == value:
        value ^= 0xFF
    return data[:index] + bytes([value]) + data[index + 1 :]


def test_the_unmutated_envelope_is_allowed() -> None:
    assert not _denied(ENVELOPE)


@SETTINGS
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_no_single_byte_change_to_the_payload_is_allowed(index: int, value: int) -> None:
    doc = dict(DOC)
    doc["payload"] = base64.b64encode(_mutate(PAYLOAD, index, value)).decode()
    assert _denied(json.dumps(doc).encode())


@SETTINGS
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_no_single_byte_change_to_the_leaf_certificate_is_allowed(index: int, value: int) -> None:
    # Mutate the DER inside the PEM so the change is meaningful, then re-armour it.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(LEAF_PEM).public_bytes(Encoding.DER)
    mutated = _mutate(der, index, value)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(mutated) + b"-----END CERTIFICATE-----\n"
    doc = json.loads(ENVELOPE)
    doc["signatures"][0]["certificates"][0] = pem.decode()
    assert _denied(json.dumps(doc).encode())


@SETTINGS
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_to_the_envelope_is_denied_or_harmless(index: int, value: int) -> None:
    """A change to the envelope's JSON framing may leave the same signed content (whitespace, base64 spelling);
    then it is the same signed manifest. Otherwise it must be denied. Never a crash."""
    mutated = _mutate(ENVELOPE, index, value)
    try:
        result = verify(mutated, STORE, DEFAULT_POLICY, NOW)
    except HostguardError:
        return
    assert parse_envelope(mutated).payload == PAYLOAD
    assert (result.facts, result.signer_subjects) == (BASELINE.facts, BASELINE.signer_subjects)


@SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    assert _denied(data)


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_nested_json_never_crashes_or_hangs(depth: int) -> None:
    assert _denied(b"[" * depth + b"]" * depth)
