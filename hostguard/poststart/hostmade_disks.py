"""The disk-content stage's part for host-made disks (issue 15, docs/adr/0028-host-made-disk-content.md): disks a
stack profile let start unsigned (Nova's ephemeral and swap disks and config drive, KubeVirt's NoCloud seed).

No manifest lists their files, so every executable component on them (the inventory's rule:
`imagefs.inventory.is_executable_component`) is a finding, `executable-on-host-made-disk` at "TARGET:/path".
Each disk is read as QEMU sees it, through its recorded chain (`imagefs.overlayview.effective_files`, the code
the signed disks use; every layer the file pre-boot recorded), inside the same hold as the signed disks, under
the reader's Limits. A swap area and the stack's ISO 9660 or vfat config drive or seed, which the fast reader does
not parse, are a note on the verdict naming the disk; a disk the guest writes that cannot be read (a filesystem
the reader does not know, a limit passed) is `check-unavailable`, as for a signed disk. A layer that is not the
recorded file is `unverified-file-open`, as for the signed disks; malformed filesystem data is `check-unavailable`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hostguard.domain.record import DomainRecord
from hostguard.errors import ImageError
from hostguard.imagefs import MALFORMED_INPUT_ERRORS
from hostguard.imagefs.chain import ChainMismatch, LayerRecord
from hostguard.imagefs.overlayview import effective_files
from hostguard.record import Record, field
from hostguard.signed.findings import CHECK_UNAVAILABLE, UNVERIFIED_OPEN, Finding, host_made_findings

CHECK = "the host-made disk content check"


class HostMadeDisk(Record, frozen=False):
    target: str
    kind: str  # what the profile allowed it as, e.g. "Nova ephemeral base"
    layers: list[LayerRecord]  # top first
    stats: dict[str, Any] = field(default_factory=dict)


def host_made_disks(record: DomainRecord) -> list[HostMadeDisk]:
    """The record's host-made disks, each with its chain. The hook admits only a raw base under qcow2 overlays
    (`preboot.hostmade.classify`), so the formats follow from the position: the record does not carry them."""
    by_target: dict[str, HostMadeDisk] = {}
    for h in record.host_made or ():
        disk = by_target.setdefault(h.target, HostMadeDisk(h.target, h.kind, []))
        disk.layers.append(LayerRecord(Path(h.path), "qcow2", h.dev, h.ino))  # top first, as recorded
    for disk in by_target.values():
        base = disk.layers[-1]
        disk.layers[-1] = LayerRecord(base.path, "raw", base.dev, base.ino)
    return list(by_target.values())


def inspect_host_made(disk: HostMadeDisk) -> tuple[list[Finding], list[Finding]]:
    """(findings, notes) for one host-made disk, read while the domain is held still."""
    started = time.monotonic()
    try:
        return _inspect(disk)
    finally:
        disk.stats["ms"] = round((time.monotonic() - started) * 1000, 1)


def _inspect(disk: HostMadeDisk) -> tuple[list[Finding], list[Finding]]:

    def note(why: str) -> Finding:
        disk.stats["read"] = False
        return Finding(CHECK_UNAVAILABLE, disk.target, CHECK, f"{disk.target} ({disk.kind}) not read: {why}")

    try:
        # No index: the base is a freshly made, empty filesystem (or swap), so whatever the view holds the
        # overlays wrote; a full inventory of the view reads no more than an incremental one would.
        files, stats = effective_files([disk.layers], None, None)
    except ChainMismatch as err:
        expected = "the chain of files the pre-boot check recorded"
        return [Finding(UNVERIFIED_OPEN, disk.target, expected, err.message)], []
    except ImageError as err:  # UnsupportedLayout included: ISO 9660, vfat, swap, a limit
        why = err.message
        # Swap is read too (a guest may have made a filesystem there); left as swap, it holds no files.
        if "swap" in disk.kind.lower() and "no filesystem found" in why:
            return [], [note("a swap area holds no files")]
        if "config drive" in disk.kind or "seed" in disk.kind:
            return [], [note(why)]  # the stack's own ISO 9660 / vfat data, which the fast reader does not parse
        # A disk the guest writes (its ephemeral disk, or a filesystem it made on its swap disk) that cannot be
        # read or exceeds a limit: the guest could hide executables that way, so it is a finding, as for a signed
        # disk that cannot be read (its action is the policy's).
        found = f"{disk.target} ({disk.kind}) cannot be read: {why}"
        return [Finding(CHECK_UNAVAILABLE, disk.target, CHECK, found)], []
    except MALFORMED_INPUT_ERRORS as err:
        found = f"{disk.target} ({disk.kind}): malformed disk data ({type(err).__name__}: {err})"
        return [Finding(CHECK_UNAVAILABLE, disk.target, CHECK, found)], []
    disk.stats.update({"read": True, "executables": len(files), **stats.to_json()})
    return host_made_findings(disk.target, files), []
