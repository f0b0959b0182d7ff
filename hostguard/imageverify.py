"""Verify an envelope against files on this host: the adapter the CLI, the hook and the library share.

Reads the envelope, the trust directory and the image files; runs the pure checks in `hostguard.verify`;
keeps rollback state. A verdict cache makes re-verifying an unchanged envelope against an unchanged trust
store cheap (no certificate parsing): its key covers the exact envelope and trust-store bytes, and an entry is
used only inside the window in which certificates, CRLs and the manifest stay valid. Rollback and disk
digests are checked on every call, cached verdict or not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostguard import __version__
from hostguard.errors import FormatError, RollbackError, UsageError
from hostguard.manifest import Manifest, format_time, parse_manifest
from hostguard.trustdir import read_trust_dir

if TYPE_CHECKING:
    from hostguard.digest import Digested
    from hostguard.state import StateStore

MAX_ENVELOPE_FILE = 96 * 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    manifest: Manifest  # `files` is empty when the verdict came from the cache
    signer_subjects: tuple[str, ...]
    checks: tuple[str, ...]
    disks: tuple[Digested, ...] = ()
    boot: tuple[Digested, ...] = ()
    cached_verdict: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "allow",
            "image": {"name": self.manifest.image.name, "version": self.manifest.image.version},
            "expires": format_time(self.manifest.expires),
            "signers": list(self.signer_subjects),
            "checks": list(self.checks),
            "disks": [{"path": str(d.path), "sha256": d.blob.sha256, "cached": d.cached} for d in self.disks],
            "cached_verdict": self.cached_verdict,
        }


def read_envelope(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_ENVELOPE_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read envelope {path}: {exc.strerror}") from None
    if len(data) > MAX_ENVELOPE_FILE:
        raise FormatError(f"envelope {path} is over the {MAX_ENVELOPE_FILE}-byte limit")
    return data


def _summary(manifest: Manifest) -> dict[str, Any]:
    doc = manifest.to_json()
    doc["files"] = []
    return doc


def verify_files(
    envelope: bytes,
    trust_dir: Path,
    *,
    now: dt.datetime,
    state: StateStore | None = None,
    images: Sequence[Path] | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    digested: Sequence[Digested] | None = None,
) -> Outcome:
    """Every check of the signed-manifest contract. Raises VerificationError / ConfigError.

    `digested` lets a caller that already hashed the images through its own descriptors (the hook) pass them.
    """
    from hostguard.digest import digest_file
    from hostguard.verify import check_boot, check_disks

    files = read_trust_dir(trust_dir)
    key = hashlib.sha256(
        b"%s\0%s\0%s"
        % (__version__.encode(), hashlib.sha256(envelope).hexdigest().encode(), files.fingerprint.encode())
    ).hexdigest()
    stamp = now.timestamp()
    cached = state.cached_verdict(key, stamp) if state is not None else None
    if cached is not None:
        manifest = parse_manifest(json.dumps(cached["manifest"]).encode())
        signers = tuple(str(s) for s in cached["signers"])
        checks = tuple(str(c) for c in cached["checks"])
    else:
        from hostguard.verify import verify_envelope

        store, policy = files.load()
        result = verify_envelope(envelope, store, policy, now)
        manifest = result.manifest
        signers = tuple(s.subject for s in result.signers)
        checks = result.checks
        if state is not None:
            state.store_verdict(
                key,
                result.valid_from.timestamp(),
                result.valid_until.timestamp(),
                {"manifest": _summary(manifest), "signers": list(signers), "checks": list(checks)},
            )

    checks_done = list(checks)
    if state is not None:
        highest = state.highest_version(manifest.image.name)
        if highest is not None and manifest.image.version < highest:
            raise RollbackError(f"{manifest.image} is older than version {highest} already verified on this host")
        checks_done.append("rollback")

    disks: list[Digested] = list(digested or ())
    for path in images or ():
        disks.append(digest_file(path, state))
    if images is not None or digested is not None:
        check_disks(manifest, [d.blob for d in disks])
        checks_done.append("disk digest")
    boot: list[Digested] = []
    if kernel is not None or initrd is not None:
        k = digest_file(kernel, state) if kernel else None
        i = digest_file(initrd, state) if initrd else None
        check_boot(manifest, k.blob if k else None, i.blob if i else None)
        boot = [d for d in (k, i) if d is not None]
        checks_done.append("boot files")

    if state is not None:
        state.record_version(manifest.image.name, manifest.image.version)
    return Outcome(
        manifest=manifest,
        signer_subjects=signers,
        checks=tuple(checks_done),
        disks=tuple(disks),
        boot=tuple(boot),
        cached_verdict=cached is not None,
    )
