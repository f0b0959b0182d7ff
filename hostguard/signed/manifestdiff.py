"""Compare two manifests: which executable components were added, removed or changed, and how. Pure.

Producers run `hostguard manifest diff OLD NEW` to review a new release before signing it. Changes that
widen privilege (a new setuid/setgid bit, new or different file capabilities, a new owner) are flagged,
as are changes to the image identity, the disks and the boot files.
"""

from __future__ import annotations

from typing import Any

from hostguard.record import Record
from hostguard.signed.manifest import FileEntry, Manifest, format_time

FIELDS = ("sha256", "size", "mode", "uid", "gid", "capabilities")


class FileChange(Record):
    old: FileEntry
    new: FileEntry
    fields: tuple[str, ...]  # which of FIELDS differ, in that order

    @property
    def path(self) -> str:
        return self.new.path

    @property
    def privilege_widened(self) -> bool:
        """setuid/setgid gained, capabilities gained or changed, or ownership changed."""
        gained = self.new.mode & ~self.old.mode & 0o6000
        caps = self.new.capabilities is not None and self.new.capabilities != self.old.capabilities
        owner = (self.new.uid, self.new.gid) != (self.old.uid, self.old.gid)
        return bool(gained) or caps or owner


class ManifestDiff(Record):
    added: tuple[FileEntry, ...]
    removed: tuple[FileEntry, ...]
    changed: tuple[FileChange, ...]
    unchanged: int
    header: tuple[tuple[str, str, str], ...]  # (what, old, new) for image/expiry/disks/boot differences

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.header)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": [f.to_json() for f in self.added],
            "removed": [f.to_json() for f in self.removed],
            "changed": [
                {
                    "path": c.path,
                    "fields": list(c.fields),
                    "old": c.old.to_json(),
                    "new": c.new.to_json(),
                    "privilege_widened": c.privilege_widened,
                }
                for c in self.changed
            ],
            "unchanged": self.unchanged,
            "header": [{"field": w, "old": o, "new": n} for w, o, n in self.header],
        }


def diff_manifests(old: Manifest, new: Manifest) -> ManifestDiff:
    old_files = old.files_by_path()
    new_files = new.files_by_path()
    added = tuple(new_files[p] for p in sorted(new_files.keys() - old_files.keys()))
    removed = tuple(old_files[p] for p in sorted(old_files.keys() - new_files.keys()))
    changed: list[FileChange] = []
    unchanged = 0
    for path in sorted(old_files.keys() & new_files.keys()):
        a, b = old_files[path], new_files[path]
        fields = tuple(f for f in FIELDS if getattr(a, f) != getattr(b, f))
        if fields:
            changed.append(FileChange(a, b, fields))
        else:
            unchanged += 1
    return ManifestDiff(added, removed, tuple(changed), unchanged, _header(old, new))


def _header(old: Manifest, new: Manifest) -> tuple[tuple[str, str, str], ...]:
    out: list[tuple[str, str, str]] = []

    def check(what: str, a: object, b: object) -> None:
        if a != b:
            out.append((what, _text(a), _text(b)))

    check("image", str(old.image), str(new.image))
    check("expires", format_time(old.expires), format_time(new.expires))
    check("disks", [d.to_json() for d in old.disks], [d.to_json() for d in new.disks])
    check("boot", old.boot.to_json() if old.boot else None, new.boot.to_json() if new.boot else None)
    return tuple(out)


def _text(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={_text(v)}" for k, v in sorted(value.items())) or "none"
    if value is None:
        return "none"
    return str(value)


def _describe(entry: FileEntry) -> str:
    caps = f" caps={entry.capabilities}" if entry.capabilities else ""
    return f"sha256={entry.sha256[:16]} size={entry.size} mode={entry.mode:04o} uid={entry.uid} gid={entry.gid}{caps}"


def _field(entry: FileEntry, name: str) -> str:
    value = getattr(entry, name)
    if name == "mode":
        return f"{value:04o}"
    if name == "sha256":
        return str(value)[:16]
    return "none" if value is None else str(value)


def render_text(diff: ManifestDiff, old_label: str = "old", new_label: str = "new") -> str:
    """Lines for a terminal: `+ path` added, `- path` removed, `~ path` changed (`!` marks wider privilege)."""
    lines = [f"--- {old_label}", f"+++ {new_label}"]
    for what, a, b in diff.header:
        lines.append(f"* {what}: {a} -> {b}")
    for entry in diff.added:
        flag = "!" if entry.mode & 0o6000 or entry.capabilities else " "
        lines.append(f"+{flag}{entry.path}  {_describe(entry)}")
    for entry in diff.removed:
        lines.append(f"- {entry.path}")
    for change in diff.changed:
        flag = "!" if change.privilege_widened else " "
        parts = ", ".join(f"{f} {_field(change.old, f)} -> {_field(change.new, f)}" for f in change.fields)
        lines.append(f"~{flag}{change.path}  {parts}")
    lines.append(
        f"{len(diff.added)} added, {len(diff.removed)} removed, {len(diff.changed)} changed, "
        f"{diff.unchanged} unchanged" + ("" if diff.empty else "; '!' marks wider privilege")
    )
    return "\n".join(lines) + "\n"
