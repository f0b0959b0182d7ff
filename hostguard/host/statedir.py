"""The state directory's files, in one place: where each kind lives, the hook->daemon DomainRecord files, and the
per-domain check lock. Everything here is root-only (0700 directories, 0600 files).

    state.db            rollback high-water marks and the caches (hostguard.host.state)
    domains/UUID.json   DomainRecord written by the hook at `prepare`, read after the start
    verdicts/UUID.json  the last post-start verdict (hostguard.poststart.verdicts)
    disk-locks/         one flock per domain: one check (and its enforcement) at a time (host.locks)
    disk-index/         indexes of signed base images for the incremental disk check
    memory/             memory-check work files and vDSO baselines
    quarantine/         domains `hostguard start` / quarantine keep paused until a pass
    sticky/UUID.json    holds: domains a verdict paused, re-paused when resumed (hostguard.poststart.sticky)
    library/            the image library's index
    bootchannel/        owner boot-channel records

Files named by a domain's UUID go once libvirt no longer knows the domain (hostguard.poststart.forget).
"""

from __future__ import annotations

import os
from pathlib import Path

from hostguard.domain.record import DomainRecord, parse_domain_record
from hostguard.errors import ConfigError, FormatError
from hostguard.host.fsutil import atomic_write


class StateDir:
    """Paths under one state directory. Creates nothing by itself."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.database = root / "state.db"
        self.domains = root / "domains"
        self.verdicts = root / "verdicts"
        self.disk_locks = root / "disk-locks"
        self.disk_index = root / "disk-index"
        self.memory = root / "memory"
        self.quarantine = root / "quarantine"
        self.library = root / "library"
        self.bootchannel = root / "bootchannel"

    def domain_record_path(self, uuid: str) -> Path:
        return self.domains / f"{safe_uuid(uuid)}.json"

    def verdict_path(self, uuid: str) -> Path:
        return self.verdicts / f"{safe_uuid(uuid)}.json"


def safe_uuid(uuid: str) -> str:
    # A uuid names a file: libvirt's are hex and dashes. Nothing that could be a path ('/', '..') or an odd
    # name (spaces, control characters) reaches the file system.
    if not uuid or len(uuid) > 64 or not all(c.isascii() and (c.isalnum() or c == "-") for c in uuid):
        raise FormatError(f"not a domain uuid: {uuid[:80]!r}")
    return uuid


# --- the hook -> daemon record ----------------------------------------------------------------------------------


def save_domain_record(state_dir: Path, record: DomainRecord) -> None:
    """Write the record the daemon reads after the start (temp file + rename: readers see old or new).

    Not fsynced: the record matters only while the domain runs, and after a host crash nothing runs; the
    two fsyncs cost more than the rest of a cached hook run under load.
    """
    paths = StateDir(state_dir)
    try:
        paths.domains.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {paths.domains}: {exc.strerror}") from None
    atomic_write(paths.domain_record_path(record.uuid), record.to_json(), mode=0o600, durable=False, error=ConfigError)


def load_domain_record(state_dir: Path, uuid: str) -> DomainRecord | None:
    """The hook's record of this domain's start; None if there is none. FormatError if it cannot be read."""
    path = StateDir(state_dir).domain_record_path(uuid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    record = parse_domain_record(data)
    if record.uuid != uuid:
        raise FormatError(f"{path} is the record of another domain ({record.uuid})")
    return record


def load_domain_records(state_dir: Path) -> dict[str, DomainRecord]:
    """Every readable record, by uuid (for `hostguard status`); unreadable ones are left out."""
    out: dict[str, DomainRecord] = {}
    directory = StateDir(state_dir).domains
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            record = load_domain_record(state_dir, path.stem)
        except FormatError:
            continue
        if record is not None:
            out[record.uuid] = record
    return out
