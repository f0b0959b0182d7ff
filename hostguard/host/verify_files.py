"""Verify an envelope against files on this host: the adapter the CLI, the hook and the library share.

Reads the envelope, the trust directory and the image files; runs the pure checks in `hostguard.signed.verify`;
keeps rollback state. A verdict cache makes re-verifying an unchanged envelope against an unchanged trust
store cheap: its key covers the exact envelope and trust-store bytes and the verifier's identity (hostguard's
verifying sources, `cryptography`), an entry is used only inside the interval around the verification time in
which no certificate, CRL or manifest time of the inputs is crossed (so a hit is exactly a full verification's
answer; docs/adr/0007-cache-trust.md), and it holds the `ImageFacts` the remaining checks need, so a cached
verdict imports neither `cryptography` nor the manifest parser. Rollback and disk digests are checked on every
call, cached verdict or not, by the same code (`hostguard.signed.facts`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
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

# The documented limit (docs/formats.md): a 64 MiB manifest in base64 plus signatures; the same as
# hostguard.signed.envelope.MAX_ENVELOPE_BYTES (not imported: the hook does not load the parser when cached).
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

        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
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
    """The envelope's bytes. Refuses, without blocking and before reading, anything but a regular file of at
    most MAX_ENVELOPE_FILE bytes (a FIFO would block `verify` and the daemon forever; issue 22/11, 22/14)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"envelope {path} is a symlink: name the envelope file itself") from None
        raise UsageError(f"cannot read envelope {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"envelope {path} is not a regular file")
        if st.st_size > MAX_ENVELOPE_FILE:
            raise FormatError(f"envelope {path} is {st.st_size} bytes, over the {MAX_ENVELOPE_FILE}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(MAX_ENVELOPE_FILE + 1 - total, 1 << 24)):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_ENVELOPE_FILE:  # grew while being read
                raise FormatError(f"envelope {path} is over the {MAX_ENVELOPE_FILE}-byte limit")
    except OSError as exc:
        raise UsageError(f"cannot read envelope {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def verifier_identity() -> bytes:
    """What makes the verifier what it is, for the verdict cache key (issue 22/8): hostguard's version, the
    identity (name, size, mtime) of the source files that verify, and `cryptography`'s version and compiled
    core (which carries its OpenSSL), all found without importing `cryptography` (~40 ms). An upgrade of either,
    or an edited verifier, gives new keys: old verdicts are never read again.
    """
    import sys

    # os.path and strings, not pathlib: this runs on every hook start (~0.1 ms).
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    signed = os.path.join(package, "signed")
    files = [os.path.join(signed, n) for n in sorted(os.listdir(signed)) if n.endswith(".py")]
    files += [os.path.join(package, "host", "verify_files.py"), os.path.join(package, "host", "trustdir.py")]
    files.append(os.path.join(package, "strictjson.py"))
    parts = [VERDICT_FORMAT, __version__.encode()]
    for entry in sys.path:
        crypto = os.path.join(entry or ".", "cryptography")
        try:
            with open(os.path.join(crypto, "__about__.py"), "rb") as fh:
                parts.append(fh.read(65536))
        except OSError:
            continue
        bindings = os.path.join(crypto, "hazmat", "bindings")
        with contextlib.suppress(OSError):
            files += [os.path.join(bindings, n) for n in sorted(os.listdir(bindings)) if n.startswith("_rust")]
        break
    else:
        parts.append(b"no cryptography")
    for file in files:
        try:
            st = os.stat(file)
            parts.append(b"%s %d %d" % (file.encode(), st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append(b"%s missing" % file.encode())
    return b"\n".join(parts)


def verdict_key(envelope: bytes, trust_fingerprint: str) -> str:
    """The verdict cache key: the verifier's identity, the exact envelope and trust-store bytes."""
    return sha256_hex(
        b"\0".join(
            (sha256_hex(verifier_identity()).encode(), sha256_hex(envelope).encode(), trust_fingerprint.encode())
        )
    )


class _Verdict(Record):
    facts: ImageFacts
    signers: tuple[str, ...]
    checks: tuple[str, ...]
    summary: dict[str, Any]


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

    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
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
    if state is not None and result.valid_from < result.valid_until:
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
