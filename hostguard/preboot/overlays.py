"""Overlays with content, checked before boot (issue 14).

A writable overlay over a signed base can already hold data when the domain starts: what the guest wrote in an
earlier run, or what someone wrote on the host while the domain was off (an executable planted in the overlay's
clusters, a middle layer inserted into the chain). The signed base's digest says nothing about that, so the
hook reads the guest's view of the whole image set the way the daemon's disk stage does (`imagefs.overlayview`:
the base index, then only what the overlays allocate) and compares it with the manifest's file list.

What a finding costs is the daemon's own `[findings]` policy: paths in `[findings.allow]` are ignored, a kind
whose action is "log" is noted in the audit record, anything else denies the start in one line. A check that
cannot run (a manifest without files, a filesystem the fast reader lacks) is a `check-unavailable` finding
under the same policy (logged by default, as the daemon does).

`overlays_written` runs on every start and must cost nothing for a fresh overlay: it reads each overlay's
header and L1 table only (an overlay whose L1 table points nowhere allocates no cluster). Everything else is
imported only when an overlay has content.
"""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence
    from pathlib import Path

    from hostguard.host.config import Config
    from hostguard.host.state import StateStore
    from hostguard.host.trustdir import TrustDirFiles
    from hostguard.host.verify_files import Outcome
    from hostguard.preboot.decide import DiskPlan
    from hostguard.signed.findings import Finding

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
_HEAD = struct.Struct(">Q4xIQ")  # virtual size (24), l1_size (36), l1_table_offset (40)


def _qcow2_geometry(fd: int) -> tuple[int, int, int]:
    raw = os.pread(fd, 48, 0)
    if len(raw) < 48:
        return -1, 0, 0
    size, l1_size, l1_offset = _HEAD.unpack_from(raw, 24)
    return size, l1_size, l1_offset


def overlays_written(layers: Sequence[tuple[Path, str, int]]) -> bool:
    """Whether the guest could see anything but the signed base through these layers (top first, the last one
    the base; each an open descriptor whose qcow2 header was validated): an overlay L1 entry that points
    somewhere, or a layer whose virtual size differs from the base's. Unsure means True (the full check runs)."""
    *overlays, (_, base_fmt, base_fd) = layers
    base_size = _qcow2_geometry(base_fd)[0] if base_fmt == "qcow2" else os.fstat(base_fd).st_size
    for _, fmt, fd in overlays:
        if fmt != "qcow2":
            return True
        size, l1_size, l1_offset = _qcow2_geometry(fd)
        if size != base_size or l1_size * 8 > MAX_L1_BYTES:
            return True
        table = os.pread(fd, l1_size * 8, l1_offset)
        if len(table) != l1_size * 8:
            return True
        if table.count(0) != len(table) and any(e & L1E_OFFSET_MASK for e in struct.unpack(f">{l1_size}Q", table)):
            return True
    return False


def check_overlays(
    plans: Sequence[DiskPlan],
    outcomes: Sequence[tuple[Path, Outcome]],
    config: Config,
    state: StateStore,
    *,
    trust: TrustDirFiles,
    now: dt.datetime | float,
) -> list[str]:
    """Check every image set that has a written overlay; return notes for the audit record, or raise
    DomainError (one line) when the policy acts on a finding."""
    # lazy: only a start with an overlay that holds data reads the guest's filesystems
    from hostguard.errors import DomainError

    policy = config.finding_policy()
    notes: list[str] = []
    for envelope, outcome in outcomes:
        members = [p for p in plans if p.envelope == envelope]
        if not any(p.written for p in members):
            continue
        targets = ", ".join(p.target for p in members)
        findings, summary = _check_set(envelope, outcome, members, config, state, trust=trust, now=now)
        kept = policy.filter(findings)
        action = policy.action_for(kept)
        if action in ("pause", "destroy"):
            acted = [f for f in kept if policy.actions.get(f.kind, "pause") != "log"]
            raise DomainError(
                f"disk {targets}: the overlay content differs from {outcome.facts.label}: {_describe(acted)} "
                "(checked before boot; paths that may change belong in [findings.allow])"
            )
        notes.append(f"disk {targets}: overlay content checked before boot: {summary}")
        notes += [f"disk {targets}: logged by policy: {f.describe()}" for f in kept[:5]]
    return notes


def _describe(findings: Sequence[Finding], limit: int = 3) -> str:
    head = "; ".join(f.describe() for f in findings[:limit])
    more = f" (+{len(findings) - limit} more)" if len(findings) > limit else ""
    return f"{len(findings)} finding(s): {head}{more}"


def _check_set(
    envelope: Path,
    outcome: Outcome,
    members: Sequence[DiskPlan],
    config: Config,
    state: StateStore,
    *,
    trust: TrustDirFiles,
    now: dt.datetime | float,
) -> tuple[list[Finding], str]:
    """The findings of one image set's effective view, and a one-line summary of how it was read."""
    import time

    # lazy: only a start with an overlay that holds data reads the guest's filesystems
    from hostguard.errors import DomainError, ImageError
    from hostguard.host.verify_files import read_envelope, verify_files
    from hostguard.imagefs import MALFORMED_INPUT_ERRORS
    from hostguard.imagefs.chain import ChainMismatch, LayerRecord
    from hostguard.imagefs.overlayview import LazyBases, effective_files, load_or_build_index
    from hostguard.signed.envelope import parse_envelope
    from hostguard.signed.findings import CHECK_UNAVAILABLE, UNVERIFIED_OPEN, Finding, compare_files
    from hostguard.signed.manifest import parse_manifest

    what = members[0].target
    started = time.monotonic()

    def unavailable(why: str) -> tuple[list[Finding], str]:
        return [Finding(CHECK_UNAVAILABLE, what, "the overlay content check", why)], f"not checked: {why}"

    # The envelope is read again for its file list, and verified again (a cache hit) so that the list comes
    # from the very bytes that verify: the file could have been replaced since.
    data = read_envelope(envelope)
    again = verify_files(data, config.trust_dir, now=now, state=state, trust=trust)
    if (again.facts.name, again.facts.version) != (outcome.facts.name, outcome.facts.version):
        raise DomainError(f"envelope {envelope} changed while the domain was verified")
    manifest = parse_manifest(parse_envelope(data).payload)
    if not manifest.files:
        return unavailable(f"{outcome.facts.label}: the manifest lists no files to compare the disks with")
    slots: dict[tuple[str, int], int] = {}
    for i, d in enumerate(manifest.disks):
        slots[(d.sha256, d.size)] = i
        if d.content is not None:
            slots[(d.content.sha256, d.content.size)] = i
    ordered: dict[int, DiskPlan] = {}
    for plan in members:
        assert plan.digested is not None
        slot = slots.get((plan.digested.sha256, plan.digested.size))
        if slot is None or slot in ordered:
            return unavailable(f"{outcome.facts.label}: disk {plan.target} is not one of the manifest's disks")
        ordered[slot] = plan
    if sorted(ordered) != list(range(len(manifest.disks))):
        return unavailable(f"{outcome.facts.label} has {len(manifest.disks)} disk(s); the domain attaches others")
    chains = [
        [LayerRecord(x.path, x.format, x.identity.dev, x.identity.ino) for x in ordered[i].layers]
        for i in range(len(ordered))
    ]
    digests = [d.sha256 for d in (ordered[i].digested for i in range(len(ordered))) if d is not None]
    try:
        with LazyBases(chains) as base:
            index, built = load_or_build_index(config.state_dir, base, digests)
            files, stats = effective_files(chains, index, base)
    except ChainMismatch as err:
        return [Finding(UNVERIFIED_OPEN, what, "the chain of files verified", err.message)], "chain changed"
    except ImageError as err:  # UnsupportedLayout included
        return unavailable(f"{outcome.facts.label}: the disk cannot be read: {err.message}")
    except MALFORMED_INPUT_ERRORS as err:
        return unavailable(f"{outcome.facts.label}: malformed disk data ({type(err).__name__}: {err})")
    ms = (time.monotonic() - started) * 1000
    summary = (
        f"{stats.mode}, {stats.changed_bytes} bytes allocated, {stats.dirty_inodes} inode(s) changed, "
        f"{stats.hashed_files} file(s) hashed, index {'built' if built else 'cached'}, {ms:.0f} ms"
    )
    return compare_files(manifest.files, files), summary
