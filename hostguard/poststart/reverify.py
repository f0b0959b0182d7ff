"""The full signed manifest (with its `files`) behind a running domain, re-verified before use.

The hook's domain record names the envelope each disk was verified against. Re-verifying it is cheap (verdict
cache); the cached path returns the manifest without its file list, so the payload is parsed here once the
envelope bytes have passed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hostguard.host.config import Config
from hostguard.host.verify_files import read_envelope, verify_files
from hostguard.signed.envelope import parse_envelope
from hostguard.signed.manifest import Manifest, parse_manifest


def load_verified_manifest(config: Config, envelope_path: Path) -> Manifest:

    envelope = read_envelope(envelope_path)
    verify_files(envelope, config.trust_dir, now=dt.datetime.now(dt.UTC))  # raises unless it still verifies
    return parse_manifest(parse_envelope(envelope).payload)
