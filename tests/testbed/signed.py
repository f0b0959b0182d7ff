"""Build manifests and signed envelopes in memory for tests (through hostguard's own signing code)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives.serialization import Encoding

from hostguard.signed.envelope import PAYLOAD_TYPE, Envelope, Signature
from hostguard.signed.manifest import DiskEntry, FileEntry, ImageId, Manifest
from hostguard.signed.signing import PrivateKeySigner, key_id
from tests.testbed.pki import NOW, Identity


def disk_of(data: bytes, fmt: str = "raw") -> DiskEntry:
    return DiskEntry(hashlib.sha256(data).hexdigest(), len(data), fmt)


def make_manifest(
    name: str = "web",
    version: int = 1,
    disks: Sequence[DiskEntry] = (),
    files: Sequence[FileEntry] = (),
    created: dt.datetime = NOW - dt.timedelta(days=1),
    expires: dt.datetime = NOW + dt.timedelta(days=90),
) -> Manifest:
    return Manifest(
        image=ImageId(name, version),
        created=created,
        expires=expires,
        disks=tuple(disks) or (disk_of(b"disk image bytes"),),
        files=tuple(files),
    )


def signature(
    payload: bytes, who: Identity, chain: Sequence[Identity] = (), payload_type: str = PAYLOAD_TYPE
) -> Signature:
    signer = PrivateKeySigner(who.key)
    env = Envelope(payload_type, payload, ())
    return Signature(
        keyid=key_id(who.cert.public_key()),
        sig=signer.sign(env.pae()),
        certificates=tuple(i.cert.public_bytes(Encoding.PEM) for i in (who, *chain)),
    )


def sign(
    payload: bytes | Manifest,
    signers: Sequence[tuple[Identity, Sequence[Identity]]],
    payload_type: str = PAYLOAD_TYPE,
) -> bytes:
    """Envelope bytes with one signature per (identity, chain)."""
    data = payload.to_bytes() if isinstance(payload, Manifest) else payload
    sigs = tuple(signature(data, who, chain, payload_type) for who, chain in signers)
    return Envelope(payload_type, data, sigs).to_bytes()
