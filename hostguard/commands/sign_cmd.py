"""`hostguard sign`: add a signature to a DSSE envelope over a manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hostguard.errors import EXIT_ALLOW, FormatError, HostguardError, UsageError
from hostguard.host.fsutil import atomic_write, read_input
from hostguard.signed import signing, trust
from hostguard.signed.envelope import PAYLOAD_TYPE, Envelope, Signature, parse_envelope
from hostguard.signed.manifest import parse_manifest


def sign(args: argparse.Namespace) -> int:

    payload = read_input(args.manifest, "manifest")
    try:
        manifest = parse_manifest(payload)  # never sign something hosts would refuse to parse
        certs = trust.load_pem_certificates(read_input(args.cert, "certificate"), args.cert)
        if args.chain:
            certs += trust.load_pem_certificates(read_input(args.chain, "chain"), args.chain)
    except FormatError as exc:
        raise UsageError(exc.message) from None
    signer = signing.load_signer(args.key)
    if signing.key_id(signer.public_key()) != signing.key_id(certs[0].public_key()):
        raise UsageError(f"{args.key} is not the private key of the certificate {args.cert}")

    from cryptography.hazmat.primitives.serialization import Encoding

    out = Path(args.output)
    envelope = Envelope(PAYLOAD_TYPE, payload, ())
    if out.exists():
        try:
            existing = parse_envelope(read_input(args.output, "envelope"))
        except HostguardError as exc:
            raise UsageError(f"{out} exists and is not a usable envelope: {exc}") from None
        if existing.payload != payload or existing.payload_type != PAYLOAD_TYPE:
            raise UsageError(f"{out} holds a different manifest: write the signature to a new file")
        envelope = existing
    sig = Signature(
        keyid=signing.key_id(signer.public_key()),
        sig=signer.sign(envelope.pae()),
        certificates=tuple(c.public_bytes(Encoding.PEM) for c in certs),
    )
    atomic_write(out, envelope.with_signature(sig).to_bytes())
    print(
        f"signed {manifest.image} as {trust.subject_of(certs[0])} -> {out} "
        f"({len(envelope.signatures) + 1} signature(s))",
        file=sys.stderr,
    )
    return EXIT_ALLOW
