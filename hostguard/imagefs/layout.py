"""Where each filesystem appears in the guest: the root, the guest's /etc/fstab, and `//LOCATOR` names. Pure.

Rules (identical for both readers, so their file lists agree):

* The root filesystem is the only one holding /etc/fstab; or, failing that, the only filesystem there is.
  With no root (several filesystems, none or several with an fstab) every filesystem is named by locator.
* The root's fstab places other filesystems: `UUID=`, `LABEL=`, `PARTUUID=`, `PARTLABEL=`, the
  `/dev/disk/by-*/` forms, `/dev/[hsv]dXN` and `/dev/xvdXN` (disk X counted from a in image order) and, for
  the guestfs reader, LVM `/dev/VG/LV` and `/dev/mapper/VG-LV`. The first entry naming a filesystem wins;
  a mountpoint already taken, "/", or one with a ".." component is ignored.
* Btrfs (ADR 0022): each subvolume is a filesystem. An fstab entry naming the Btrfs filesystem mounts the
  subvolume its `subvolid=`/`subvol=` options select, or the default subvolume without them, as the kernel
  does. A subvolume that fstab does not mount is placed inside the nearest placed subvolume that contains
  it (the guest sees a nested subvolume there), e.g. `@/var/lib/machines` under `@` mounted at `/`. When
  several subvolumes of one Btrfs hold an /etc/fstab (root snapshots), the default subvolume among them is
  the root.
* A file is named by its guest path unless it is hidden by a filesystem mounted on one of its ancestors
  (or on itself); then, like every file of an unplaced filesystem, it is `//LOCATOR/path-inside-it`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from hostguard.imagefs import FilesystemInfo
from hostguard.record import Record

FSTAB = b"/etc/fstab"
_OCTAL = re.compile(rb"\\([0-7]{3})")
_DEVNAME = re.compile(rb"/dev/(?:[shv]d|xvd)([a-z]+)(\d*)")


class Layout(Record):
    """Mountpoints (guest paths, no trailing slash; b"" for the root) by filesystem locator."""

    mounts: Mapping[str, bytes]

    def guest_path(self, locator: str, path: bytes) -> bytes:
        """The manifest path of `path` (absolute inside the filesystem `locator`)."""
        mount = self.mounts.get(locator)
        if mount is not None:
            full = mount + path
            if not self._hidden(locator, mount, full):
                return full
        return b"//" + locator.encode() + path

    def _hidden(self, locator: str, mount: bytes, full: bytes) -> bool:
        for other, point in self.mounts.items():
            below = point.startswith(mount + b"/")  # mounted inside our tree (mount b"" is the root)
            if other != locator and below and (full == point or full.startswith(point + b"/")):
                return True
        return False

    @property
    def root(self) -> str | None:
        return next((loc for loc, point in self.mounts.items() if point == b""), None)


def plan(filesystems: Sequence[FilesystemInfo], fstabs: Mapping[str, bytes]) -> Layout:
    """Layout from the filesystems found and the /etc/fstab contents found on them (by locator)."""
    root = _root(filesystems, fstabs)
    if root is None:
        return Layout({})
    mounts: dict[str, bytes] = {root: b""}
    text = fstabs.get(root)
    if text is None:
        return Layout(mounts)
    for spec, point, options in fstab_entries(text):
        fs = match_spec(spec, filesystems, options)
        if fs is None or fs.locator in mounts:
            continue
        if point in mounts.values():
            continue
        mounts[fs.locator] = point
    _place_nested_subvolumes(filesystems, mounts)
    return Layout(mounts)


def _root(filesystems: Sequence[FilesystemInfo], fstabs: Mapping[str, bytes]) -> str | None:
    if len(fstabs) == 1:
        return next(iter(fstabs))
    if not fstabs and len(filesystems) == 1:
        return filesystems[0].locator
    # Several subvolumes of one Btrfs hold an fstab (snapshots of the root, openSUSE's snapper layout): the
    # root is the default subvolume, the one a boot without subvolume options mounts, if it is one of them.
    holders = [f for f in filesystems if f.locator in fstabs]
    one_btrfs = all(f.subvolid is not None for f in holders) and len({_btrfs_base(f) for f in holders}) == 1
    defaults = [f.locator for f in holders if f.default_subvolume]
    if len(holders) == len(fstabs) and one_btrfs and len(defaults) == 1:
        return defaults[0]
    return None


def _place_nested_subvolumes(filesystems: Sequence[FilesystemInfo], mounts: dict[str, bytes]) -> None:
    """Unplaced Btrfs subvolumes appear inside the nearest placed subvolume that contains them."""
    subvols = sorted((fs for fs in filesystems if fs.subvolume is not None), key=lambda f: len(f.subvolume or ""))
    for fs in subvols:
        if fs.locator in mounts:
            continue
        path = fs.subvolume or ""
        best: tuple[int, bytes] | None = None
        for other in subvols:
            point = mounts.get(other.locator)
            outer = other.subvolume or ""
            if point is None or _btrfs_base(other) != _btrfs_base(fs):
                continue
            if outer == "" or path.startswith(outer + "/"):
                rest = path[len(outer) :].lstrip("/")
                if best is None or len(outer) + 1 > best[0]:
                    best = (len(outer) + 1, point + b"/" + rest.encode("utf-8", "surrogateescape"))
        if best is not None and best[1] not in mounts.values():
            mounts[fs.locator] = best[1]


def _btrfs_base(fs: FilesystemInfo) -> str:
    """The locator of the volume holding a Btrfs subvolume (its top level's locator)."""
    return fs.locator.split(":subvolid=")[0]


def parse_fstab(text: bytes) -> list[tuple[bytes, bytes]]:
    """(device spec, normalized mountpoint) of each usable fstab line, in file order."""
    return [(spec, point) for spec, point, _options in fstab_entries(text)]


def fstab_entries(text: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(device spec, normalized mountpoint, options) of each usable fstab line, in file order."""
    out: list[tuple[bytes, bytes, bytes]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith(b"#"):
            continue
        spec, point = _unescape(fields[0]), _unescape(fields[1])
        fstype = fields[2] if len(fields) > 2 else b""
        if fstype in (b"swap", b"proc", b"sysfs", b"tmpfs", b"devpts", b"none") or not point.startswith(b"/"):
            continue
        parts = [p for p in point.split(b"/") if p and p != b"."]
        if b".." in parts or not parts:
            continue
        options = _unescape(fields[3]) if len(fields) > 3 else b""
        out.append((spec, b"/" + b"/".join(parts), options))
    return out


def _unescape(field: bytes) -> bytes:
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)


def match_spec(spec: bytes, filesystems: Sequence[FilesystemInfo], options: bytes = b"") -> FilesystemInfo | None:
    """The filesystem an fstab device spec (and, for Btrfs, its mount options) names, None if none."""
    fs = _match_device_spec(spec, filesystems)
    if fs is None or fs.subvolid is None:
        return fs
    return select_subvolume(fs, filesystems, options)


def select_subvolume(
    fs: FilesystemInfo, filesystems: Sequence[FilesystemInfo], options: bytes
) -> FilesystemInfo | None:
    """The subvolume of `fs`'s Btrfs that mount `options` select: `subvolid=`, `subvol=` (both must then
    agree, as the kernel requires), or the default subvolume."""
    subvolid: int | None = None
    subvol: str | None = None
    for opt in options.split(b","):
        name, _, value = opt.partition(b"=")
        if name == b"subvolid":
            try:
                subvolid = int(value)
            except ValueError:
                return None
        elif name == b"subvol":
            subvol = value.decode("utf-8", "surrogateescape").strip("/")
    base = _btrfs_base(fs)
    same = [f for f in filesystems if f.subvolid is not None and _btrfs_base(f) == base]
    if subvolid == 0:
        subvolid = None  # subvolid=0 means "not given" to the kernel
    if subvolid is not None:
        found = next((f for f in same if f.subvolid == subvolid), None)
        if found is not None and subvol is not None and found.subvolume != subvol:
            return None
        return found
    if subvol is not None:
        return next((f for f in same if f.subvolume == subvol), None)
    return next((f for f in same if f.default_subvolume), None)


def _match_device_spec(spec: bytes, filesystems: Sequence[FilesystemInfo]) -> FilesystemInfo | None:
    key, _, value = spec.partition(b"=")
    if value and key in (b"UUID", b"LABEL", b"PARTUUID", b"PARTLABEL"):
        value = value.strip(b'"')
        kind = key.decode().lower()
    elif spec.startswith(b"/dev/disk/by-"):
        raw_kind, _, value = spec[len(b"/dev/disk/by-") :].partition(b"/")
        kind = raw_kind.decode(errors="replace")
    else:
        return _match_device(spec, filesystems)
    for fs in filesystems:
        if kind == "uuid" and fs.uuid is not None and value.lower() == fs.uuid.encode():
            return fs
        if kind == "label" and fs.label is not None and value == fs.label:
            return fs
        if kind == "partuuid" and fs.partuuid is not None and value.lower() == fs.partuuid.encode():
            return fs
        if kind == "partlabel" and fs.partlabel is not None and value == fs.partlabel.encode():
            return fs
    return None


def _match_device(spec: bytes, filesystems: Sequence[FilesystemInfo]) -> FilesystemInfo | None:
    m = _DEVNAME.fullmatch(spec)
    if m:
        disk = 0
        for ch in m.group(1):
            disk = disk * 26 + (ch - ord("a") + 1)
        locator = f"disk{disk - 1}" + (f"p{int(m.group(2))}" if m.group(2) else "")
        return next((fs for fs in filesystems if fs.locator == locator), None)
    lv: tuple[bytes, bytes] | None = None
    if spec.startswith(b"/dev/mapper/"):
        name = spec[len(b"/dev/mapper/") :]
        split = re.fullmatch(rb"((?:[^-]|--)+)-((?:[^-]|--)+)", name)
        if split:
            lv = (split.group(1).replace(b"--", b"-"), split.group(2).replace(b"--", b"-"))
    else:
        parts = spec.split(b"/")
        if len(parts) == 4 and parts[:2] == [b"", b"dev"]:
            lv = (parts[2], parts[3])
    if lv is not None:
        locator = "lvm:" + lv[0].decode(errors="replace") + ":" + lv[1].decode(errors="replace")
        return next((fs for fs in filesystems if fs.locator == locator), None)
    return None
