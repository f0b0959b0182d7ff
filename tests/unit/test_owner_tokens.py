"""Boot-channel token formats: key hashes, the OEM token, K, and the return-channel lines."""

from __future__ import annotations

import contextlib
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostguard.errors import FormatError
from hostguard.owner import tokens
from hostguard.owner.tokens import Announcement, BootToken, Secret

H = "sha256:" + "ab" * 32


def test_key_hash_is_normalized_and_validated() -> None:
    assert tokens.parse_key_hash("AB" * 32) == H
    assert tokens.parse_key_hash(" SHA256:" + "Ab" * 32 + "\n") == H
    for bad in ("", "sha256:", "sha256:" + "ab" * 31, "sha1:" + "ab" * 32, "sha256:" + "zz" * 32):
        with pytest.raises(FormatError):
            tokens.parse_key_hash(bad)


def test_boot_token_roundtrip() -> None:
    for token in (BootToken("no-secrets", H), BootToken("shared-secret", None)):
        assert tokens.parse_boot_token(token.encode()) == token
    assert BootToken("no-secrets", H).encode() == f"hgowner1:no-secrets:{H}"


@pytest.mark.parametrize(
    "text",
    [
        "hgowner1:no-secrets:" + H[:-1],  # truncated hash
        "hgowner1:no-secrets:" + H + "x",
        "hgowner1:no-secrets:" + H.upper(),
        "hgowner1:shared-secret:extra",
        "hgowner1:magic",
        "hgowner1:no-secrets:" + H + "\n",
    ],
)
def test_tampered_oem_token_is_refused(text: str) -> None:
    with pytest.raises(FormatError):
        tokens.parse_boot_token(text)


def test_find_boot_token_ignores_other_oem_strings_and_refuses_ambiguity() -> None:
    token = BootToken("no-secrets", H).encode()
    assert tokens.find_boot_token(["vendor data", token, token]) == BootToken("no-secrets", H)
    assert tokens.find_boot_token(["vendor data"]) is None
    with pytest.raises(FormatError, match="different boot tokens"):
        tokens.find_boot_token([token, "hgowner1:shared-secret"])
    with pytest.raises(FormatError):
        tokens.find_boot_token(["hgowner1:garbage"])


def test_secret_roundtrip_and_never_shown() -> None:
    k = Secret.generate()
    encoded = k.encode()
    assert encoded.startswith(b"hgk1.") and encoded.endswith(b"\n") and len(encoded) == 5 + 43 + 1
    again = Secret.parse(encoded)
    assert again.check() == k.check() and again.mac(b"m") == k.mac(b"m")
    body = encoded[5:-1].decode()
    for shown in (repr(k), str(k), f"{k}", json.dumps({"k": str(k)})):
        assert body not in shown and "redacted" in shown
    with pytest.raises(TypeError):
        pickle.dumps(k)


def test_secret_check_reveals_nothing_usable_and_differs_per_k() -> None:
    a, b = Secret.generate(), Secret.generate()
    assert a.check() != b.check()
    assert len(a.check()) == 32
    assert a.encode()[5:-1].decode() not in a.check()


def test_wiped_secret_cannot_be_used() -> None:
    k = Secret.generate()
    k.wipe()
    assert k.wiped
    for use in (k.encode, k.check, lambda: k.mac(b"x")):
        with pytest.raises(FormatError, match="wiped"):
            use()


@pytest.mark.parametrize(
    "data",
    [b"", b"hgk1.", b"hgk1." + b"A" * 42, b"hgk1." + b"A" * 44, b"hgk2." + b"A" * 43, b"hgk1." + b"+" * 43, b"x" * 300],
)
def test_malformed_secret_is_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        Secret.parse(data)


def test_query_and_announcement_roundtrip() -> None:
    nonce = tokens.new_nonce()
    assert tokens.parse_query(tokens.encode_query(nonce)) == nonce
    ann = Announcement(nonce, "shared-secret", "unpaired", H, None, "0" * 32, None)
    line = ann.to_line()
    assert len(line) <= tokens.MAX_LINE and line.endswith(b"\n")
    assert tokens.parse_announcement(line) == ann


def _announce(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "v": 1,
        "type": "announce",
        "nonce": "0" * 32,
        "protocol": "no-secrets",
        "state": "unpaired",
        "vm_key": H,
        "owner_key": H,
        "k_check": None,
        "error": None,
    }
    doc.update(changes)
    return json.dumps(doc).encode() + b"\n"


@pytest.mark.parametrize(
    "line",
    [
        _announce(v=2),
        _announce(v=True),
        _announce(type="query"),
        _announce(protocol="other"),
        _announce(state="owned"),
        _announce(vm_key="sha256:1234"),
        _announce(vm_key=None),  # only an error announcement may lack the key
        _announce(owner_key=H.upper()),
        _announce(k_check="g" * 32),
        _announce(error="token-malformed"),  # error without state error
        _announce(state="error"),  # state error without an error code
        _announce(error="made-up", state="error"),
        _announce(extra=1),
        _announce(nonce="0" * 31),
        _announce()[:-1] + b" " * 1100 + b"\n",  # oversized
        b'{"v":1,"v":1}\n',  # duplicate key
        b"[1,2]\n",
        b"\xff\xfe\n",
        _announce()[:-1] + b"\n" + _announce(),  # two lines
    ],
)
def test_malformed_announcement_is_rejected(line: bytes) -> None:
    with pytest.raises(FormatError):
        tokens.parse_announcement(line)


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_raise_format_error(data: bytes) -> None:
    for parse in (tokens.parse_announcement, tokens.parse_query, Secret.parse):
        with contextlib.suppress(FormatError):
            parse(data)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_oem_strings_parse_or_raise_format_error(text: str) -> None:
    with contextlib.suppress(FormatError):
        tokens.find_boot_token([text, "hgowner1:" + text])
