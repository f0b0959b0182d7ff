"""Compare what was found in a running guest with its signed manifest. Pure: entries in, findings out.

A finding has a kind, a path and expected vs found. Policy (`FindingPolicy`) decides what each kind costs:
pause, destroy or log. Paths that legitimately change are allow-listed per kind by the admin (no defaults).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hostguard.errors import ConfigError
from hostguard.record import Record
from hostguard.signed.manifest import FileEntry

# Disk findings
MISSING = "missing-executable"
CHANGED = "changed-executable"
UNEXPECTED = "unexpected-executable"
UNVERIFIED_OPEN = "unverified-file-open"
UNSIGNED_HOTPLUG = "unsigned-hotplug-disk"
UNVERIFIED_BLOCK_NODE = "unverified-block-node"  # a node of QEMU's block graph pre-boot did not verify (issue 14)
UNVERIFIED_MEDIA = "unverified-media"  # a CD-ROM/floppy medium inserted after start, neither verified nor allowed
# An executable on a disk the stack made (ephemeral, swap, config drive; issue 15): no manifest lists its files,
# and its own kind lets a site act on it apart from the signed disks' findings. Path: "TARGET:/guest/path".
HOST_MADE_EXECUTABLE = "executable-on-host-made-disk"
# Memory findings (issue 7)
UNKNOWN_PROCESS = "unknown-process"
DELETED_EXECUTABLE = "deleted-executable"
UNKNOWN_MODULE = "unknown-module"
UNLISTED_ELF = "unlisted-elf-in-memory"
UNKNOWN_KERNEL = "unknown-kernel"
CHECK_UNAVAILABLE = "check-unavailable"

FINDING_KINDS = (
    MISSING,
    CHANGED,
    UNEXPECTED,
    UNVERIFIED_OPEN,
    UNSIGNED_HOTPLUG,
    UNVERIFIED_BLOCK_NODE,
    UNVERIFIED_MEDIA,
    HOST_MADE_EXECUTABLE,
    UNKNOWN_PROCESS,
    DELETED_EXECUTABLE,
    UNKNOWN_MODULE,
    UNLISTED_ELF,
    UNKNOWN_KERNEL,
    CHECK_UNAVAILABLE,
)
ACTIONS = ("log", "pause", "destroy")  # in order of severity
_FIELDS = ("sha256", "size", "mode", "uid", "gid", "capabilities")


class Finding(Record):
    kind: str
    path: str
    expected: str | None = None
    found: str | None = None

    def describe(self) -> str:
        if self.expected is None and self.found is None:
            return f"{self.kind} {self.path}"
        return f"{self.kind} {self.path}: expected {self.expected}, found {self.found}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "expected": self.expected, "found": self.found}


def _describe(entry: FileEntry, fields: Iterable[str]) -> str:
    parts = []
    for name in fields:
        value = getattr(entry, name)
        if name == "mode":
            value = oct(value)
        elif name == "sha256":
            value = value[:16]
        parts.append(f"{name}={value}")
    return " ".join(parts)


def compare_files(expected: Sequence[FileEntry], found: Sequence[FileEntry]) -> list[Finding]:
    """Executables missing, changed (any of digest, size, mode incl. setuid/setgid, owner, capabilities),
    and new executables the manifest does not list. Sorted by path, so reports are stable."""
    want = {e.path: e for e in expected}
    have = {e.path: e for e in found}
    findings: list[Finding] = []
    for path in sorted(want.keys() | have.keys()):
        w, h = want.get(path), have.get(path)
        if h is None:
            findings.append(Finding(MISSING, path))
        elif w is None:
            findings.append(Finding(UNEXPECTED, path, None, _describe(h, _FIELDS)))
        else:
            diff = [name for name in _FIELDS if getattr(w, name) != getattr(h, name)]
            if diff:
                findings.append(Finding(CHANGED, path, _describe(w, diff), _describe(h, diff)))
    return findings


def host_made_findings(target: str, found: Sequence[FileEntry]) -> list[Finding]:
    """Every executable on a host-made disk is a finding (nothing signed lists any), its path qualified by the
    disk's target so allow globs can name the disk ("vdb:/opt/*"). Sorted by path."""
    return [Finding(HOST_MADE_EXECUTABLE, f"{target}:{e.path}", None, _describe(e, _FIELDS)) for e in found]


class FindingPolicy(Record):
    """What each finding kind costs, and which paths may change without a finding."""

    actions: Mapping[str, str]
    allow: Mapping[str, tuple[str, ...]]  # kind -> path globs

    def filter(self, findings: Iterable[Finding]) -> list[Finding]:
        return [f for f in findings if not any(fnmatch.fnmatchcase(f.path, g) for g in self.allow.get(f.kind, ()))]

    def action_for(self, findings: Iterable[Finding]) -> str:
        """The most severe action any finding asks for; "none" when there are no findings."""
        worst = -1
        for f in findings:
            worst = max(worst, ACTIONS.index(self.actions.get(f.kind, "pause")))
        return "none" if worst < 0 else ACTIONS[worst]


def finding_policy(default_action: str, actions: Mapping[str, Any], allow: Mapping[str, Any]) -> FindingPolicy:
    """Build from config tables `[findings.action]` and `[findings.allow]`; unknown kinds are errors."""
    if default_action not in ACTIONS:
        raise ConfigError(f"action must be one of {', '.join(ACTIONS)}")
    table: dict[str, str] = dict.fromkeys(FINDING_KINDS, default_action)
    table[CHECK_UNAVAILABLE] = "log"  # policy decides; by default an unavailable check is recorded, not acted on
    for kind, action in actions.items():
        if kind not in FINDING_KINDS:
            raise ConfigError(f"[findings.action]: unknown finding kind {kind!r}")
        if action not in ACTIONS:
            raise ConfigError(f"[findings.action] {kind}: action must be one of {', '.join(ACTIONS)}")
        table[kind] = action
    allowed: dict[str, tuple[str, ...]] = {}
    for kind, globs in allow.items():
        if kind not in FINDING_KINDS:
            raise ConfigError(f"[findings.allow]: unknown finding kind {kind!r}")
        if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
            raise ConfigError(f"[findings.allow] {kind}: must be a list of path globs")
        allowed[kind] = tuple(globs)
    return FindingPolicy(table, allowed)
