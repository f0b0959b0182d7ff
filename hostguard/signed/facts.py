"""What a verified manifest says about the files it covers, and the checks of given files against it.

`ImageFacts` is the part of a signed manifest that the per-start checks need (image name and version for
rollback, disk and boot-file digests, the formats the disks were signed as). The verdict cache stores it, so a
re-verification needs neither `cryptography` nor the manifest parser. The checks here are the only ones the
verification adapter (`hostguard.host.verify_files`) runs, with or without a cached verdict, so both give the same
answer and the same message. Light on purpose: this module is on the hook's start-up path.
"""

from __future__ import annotations

from hostguard.errors import DigestMismatchError, RollbackError
from hostguard.record import Record

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from hostguard.signed.manifest import Manifest

Digest = tuple[str, int]  # (sha256 hex, size)


class ImageFacts(Record):
    __slots__ = ("contents", "disks", "expires", "initrd", "kernel", "name", "version")
    name: str
    version: int
    expires: str  # RFC 3339 UTC, as hostguard.signed.manifest.format_time writes it
    disks: tuple[tuple[str, int, str], ...]  # (sha256, size, format), manifest order
    # Per disk, the digest of its guest-visible content when the manifest gives one: a file with these bytes,
    # opened as raw, shows the guest exactly what the signed disk would (a raw conversion of a qcow2).
    contents: tuple[Digest | None, ...]
    kernel: Digest | None
    initrd: Digest | None

    def __init__(
        self,
        *,
        name: str,
        version: int,
        expires: str,
        disks: tuple[tuple[str, int, str], ...],
        kernel: Digest | None,
        initrd: Digest | None,
        contents: tuple[Digest | None, ...] | None = None,
    ) -> None:
        contents = contents if contents is not None else (None,) * len(disks)
        if len(contents) != len(disks):
            raise ValueError("image facts: one content entry per disk")
        self._init(
            name=name, version=version, expires=expires, disks=disks, kernel=kernel, initrd=initrd, contents=contents
        )

    @property
    def label(self) -> str:
        """The image as messages name it ("web v3"), like hostguard.signed.manifest.ImageId."""
        return f"{self.name} v{self.version}"

    @property
    def has_boot(self) -> bool:
        return self.kernel is not None or self.initrd is not None

    def disk_format(self, sha256: str, size: int) -> str | None:
        """The format a file with this digest must be opened as: the signed one for the signed file, raw for
        the signed disk's content (a raw conversion)."""
        signed = next((f for s, n, f in self.disks if (s, n) == (sha256, size)), None)
        if signed is None and (sha256, size) in self.contents:
            return "raw"
        return signed

    def disk_indexes(self, sha256: str, size: int) -> set[int]:
        """Which manifest disks a file with this digest is: the signed file itself or its raw content."""
        return {i for i, (s, n, _) in enumerate(self.disks) if (sha256, size) in ((s, n), self.contents[i])}

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ImageFacts:
        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
        from hostguard.signed.manifest import format_time

        boot = manifest.boot
        return cls(
            name=manifest.image.name,
            version=manifest.image.version,
            expires=format_time(manifest.expires),
            disks=tuple((d.sha256, d.size, d.format) for d in manifest.disks),
            kernel=(boot.kernel.sha256, boot.kernel.size) if boot and boot.kernel else None,
            initrd=(boot.initrd.sha256, boot.initrd.size) if boot and boot.initrd else None,
            contents=tuple((d.content.sha256, d.content.size) if d.content else None for d in manifest.disks),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "expires": self.expires,
            "disks": [list(d) for d in self.disks],
            "kernel": list(self.kernel) if self.kernel else None,
            "initrd": list(self.initrd) if self.initrd else None,
            "contents": [list(c) if c else None for c in self.contents],
        }

    @classmethod
    def from_json(cls, doc: object) -> ImageFacts:
        """Inverse of `to_json`. Raises ValueError on anything else (a cache entry to ignore)."""
        keys = {"name", "version", "expires", "disks", "kernel", "initrd", "contents"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise ValueError("image facts: wrong keys")
        disks, contents = doc["disks"], doc["contents"]
        if not isinstance(disks, list) or not disks or not isinstance(contents, list):
            raise ValueError("image facts: disks")
        return cls(
            name=_str(doc["name"]),
            version=_int(doc["version"]),
            expires=_str(doc["expires"]),
            disks=tuple((_str(s), _int(n), _str(f)) for s, n, f in (_seq(d, 3) for d in disks)),
            kernel=_digest_or_none(doc["kernel"]),
            initrd=_digest_or_none(doc["initrd"]),
            contents=tuple(_digest_or_none(c) for c in contents),
        )


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("image facts: expected a string")
    return value


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("image facts: expected a non-negative integer")
    return value


def _seq(value: object, length: int) -> list[object]:
    if not isinstance(value, list) or len(value) != length:
        raise ValueError("image facts: malformed entry")
    return value


def _digest_or_none(value: object) -> Digest | None:
    if value is None:
        return None
    sha, size = _seq(value, 2)
    return _str(sha), _int(size)


# --- the per-host checks: their only implementation (issue 13), run with or without a cached verdict -----------


def check_rollback(facts: ImageFacts, highest: int | None) -> None:
    if highest is not None and facts.version < highest:
        raise RollbackError(f"{facts.label} is older than version {highest} already verified on this host")


def check_disks(facts: ImageFacts, disks: Sequence[Digest]) -> None:
    """Each given disk must be a manifest disk (its file or its raw content), and every manifest disk must be
    given (no mix-and-match)."""
    seen: set[int] = set()
    for sha, size in disks:
        indexes = facts.disk_indexes(sha, size)
        if not indexes:
            raise DigestMismatchError(f"image with sha256 {sha[:16]}… is not a disk of {facts.label}")
        seen |= indexes
    missing = set(range(len(facts.disks))) - seen
    if missing:
        raise DigestMismatchError(f"{len(missing)} disk(s) of {facts.label} were not given")


def check_boot(facts: ImageFacts, kernel: Digest | None, initrd: Digest | None) -> None:
    for what, given, signed in (("kernel", kernel, facts.kernel), ("initrd", initrd, facts.initrd)):
        if given is None and signed is None:
            continue
        if given is None or signed is None:
            raise DigestMismatchError(
                f"{what}: the manifest {'lists' if signed else 'does not list'} one but "
                f"{'none' if given is None else 'one'} was given"
            )
        if given != signed:
            raise DigestMismatchError(f"{what} does not match the signed {what} of {facts.label}")
