"""Verify an envelope against files on this host: the adapter the CLI, the hook and the library share.

Reads the envelope, the trust directory and the image files; runs the pure checks in `hostguard.signed.verify`;
keeps rollback state. A verdict cache makes re-verifying an unchanged envelope against an unchanged trust
store cheap: its key covers the exact envelope and trust-store bytes (and the hostguard version), an entry is
used only inside the window in which certificates, CRLs and the manifest stay valid, and it holds the
`ImageFacts` the remaining checks need, so a cached verdict imports neither `cryptography` nor the manifest
parser. Rollback and disk digests are checked on every call, cached verdict or not, by the same code.
"""

from __future__ import annotations

from pathlib import Path

from hostguard import __version__
from hostguard.errors import FormatError, UsageError
from hostguard.host.digest import Digested, digest_file, sha256_hex
from hostguard.host.trustdir import check_crl_rollback, read_trust_dir
from hostguard.record import Record
from hostguard.signed.facts import ImageFacts, check_boot, check_disks, check_rollback

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence
    from typing import Any

    from hostguard.host.state import StateStore
    from hostguard.host.trustdir import TrustDirFiles
    from hostguard.signed.manifest import Manifest

MAX_ENVELOPE_FILE = 96 * 1024 * 1024
VERDICT_FORMAT = b"hostguard-verdict/2"


class Outcome(Record):
    __slots__ = ("boot", "cached_verdict", "checks", "disks", "facts", "manifest_summary", "signer_subjects")
    facts: ImageFacts
    signer_subjects: tuple[str, ...]
    checks: tuple[str, ...]
    disks: tuple[Digested, ...]
    boot: tuple[Digested, ...]
    cached_verdict: bool
    # The manifest without its file list (what the verdict cache keeps); `manifest` parses it on demand.
    manifest_summary: dict[str, Any]

    def __init__(
        self,
        facts: ImageFacts,
        signer_subjects: tuple[str, ...],
        checks: tuple[str, ...],
        *,
        disks: tuple[Digested, ...] = (),
        boot: tuple[Digested, ...] = (),
        cached_verdict: bool = False,
        manifest_summary: dict[str, Any] | None = None,
    ) -> None:
        self._init(
            facts=facts,
            signer_subjects=signer_subjects,
            checks=checks,
            disks=disks,
            boot=boot,
            cached_verdict=cached_verdict,
            manifest_summary=manifest_summary or {},
        )

    @property
    def manifest(self) -> Manifest:
        """The verified manifest, without its `files` (an inventory is not needed to allow a start)."""
        import json

        from hostguard.signed.manifest import parse_manifest

        return parse_manifest(json.dumps(self.manifest_summary).encode())

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "allow",
            "image": {"name": self.facts.name, "version": self.facts.version},
            "expires": self.facts.expires,
            "signers": list(self.signer_subjects),
            "checks": list(self.checks),
            "disks": [{"path": str(d.path), "sha256": d.sha256, "cached": d.cached} for d in self.disks],
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


def verdict_key(envelope: bytes, trust_fingerprint: str) -> str:
    """The verdict cache key: hostguard version, cache format, the exact envelope and trust-store bytes."""
    return sha256_hex(
        b"\0".join((VERDICT_FORMAT, __version__.encode(), sha256_hex(envelope).encode(), trust_fingerprint.encode()))
    )


class _Verdict(Record):
    __slots__ = ("checks", "facts", "signers", "summary")
    facts: ImageFacts
    signers: tuple[str, ...]
    checks: tuple[str, ...]
    summary: dict[str, Any]

    def __init__(
        self, facts: ImageFacts, signers: tuple[str, ...], checks: tuple[str, ...], summary: dict[str, Any]
    ) -> None:
        self._init(facts=facts, signers=signers, checks=checks, summary=summary)


def _from_cache(state: StateStore, key: str, stamp: float) -> _Verdict | None:
    cached = state.cached_verdict(key, stamp)
    if cached is None:
        return None
    try:
        signers, checks, summary = cached["signers"], cached["checks"], cached["manifest"]
        if not (isinstance(signers, list) and signers and isinstance(checks, list) and isinstance(summary, dict)):
            return None
        return _Verdict(
            ImageFacts.from_json(cached["facts"]), tuple(map(str, signers)), tuple(map(str, checks)), summary
        )
    except (KeyError, ValueError):
        return None  # an entry this version cannot read: verify again and replace it


def _verify_signed(
    envelope: bytes, files: TrustDirFiles, now: dt.datetime | float, state: StateStore | None, key: str
) -> _Verdict:
    import datetime as dt

    from hostguard.signed.verify import verify_envelope

    if not isinstance(now, dt.datetime):
        now = dt.datetime.fromtimestamp(now, dt.UTC)

    store, policy = files.load(state)  # with state: CRL numbers held to this host's high-water marks
    result = verify_envelope(envelope, store, policy, now)
    summary = result.manifest.to_json()
    summary["files"] = []
    verdict = _Verdict(
        ImageFacts.from_manifest(result.manifest), tuple(s.subject for s in result.signers), result.checks, summary
    )
    if state is not None:
        state.store_verdict(
            key,
            result.valid_from.timestamp(),
            result.valid_until.timestamp(),
            {
                "facts": verdict.facts.to_json(),
                "manifest": summary,
                "signers": list(verdict.signers),
                "checks": list(verdict.checks),
            },
        )
    return verdict


def verify_files(
    envelope: bytes,
    trust_dir: Path,
    *,
    now: dt.datetime | float,
    state: StateStore | None = None,
    trust: TrustDirFiles | None = None,
    images: Sequence[Path] | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    digested: Sequence[Digested] | None = None,
) -> Outcome:
    """Every check of the signed-manifest contract. Raises VerificationError / ConfigError.

    `now` is a datetime or a POSIX timestamp (which spares the datetime import when the verdict is cached).
    `trust` is the trust directory's content when the caller has already read `trust_dir`.
    `digested` lets a caller that already hashed the images through its own descriptors (the hook) pass them.
    """
    files = trust if trust is not None else read_trust_dir(trust_dir)
    if state is not None:
        check_crl_rollback(files, state)  # before a cached verdict: were these CRLs superseded since?
    key = verdict_key(envelope, files.fingerprint)
    verdict = _from_cache(state, key, now if isinstance(now, float) else now.timestamp()) if state is not None else None
    cached = verdict is not None
    if verdict is None:
        verdict = _verify_signed(envelope, files, now, state, key)
    facts = verdict.facts

    checks_done = list(verdict.checks)
    if state is not None:
        check_rollback(facts, state.highest_version(facts.name))
        checks_done.append("rollback")

    disks: list[Digested] = list(digested or ())
    for path in images or ():
        disks.append(digest_file(path, state))
    if images is not None or digested is not None:
        check_disks(facts, [(d.sha256, d.size) for d in disks])
        checks_done.append("disk digest")
    boot: list[Digested] = []
    if kernel is not None or initrd is not None:
        k = digest_file(kernel, state) if kernel else None
        i = digest_file(initrd, state) if initrd else None
        check_boot(facts, (k.sha256, k.size) if k else None, (i.sha256, i.size) if i else None)
        boot = [d for d in (k, i) if d is not None]
        checks_done.append("boot files")

    if state is not None:
        state.record_version(facts.name, facts.version)
    return Outcome(
        facts=facts,
        signer_subjects=verdict.signers,
        checks=tuple(checks_done),
        disks=tuple(disks),
        boot=tuple(boot),
        cached_verdict=cached,
        manifest_summary=verdict.summary,
    )
