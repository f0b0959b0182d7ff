"""Per-domain state of domains libvirt no longer knows, removed by the daemon (issue 20: a soak found about five
files per started-and-undefined domain kept forever).

The daemon sweeps at its start, after a reconnect and at libvirt's UNDEFINED event. A domain's files go only
when libvirt itself answers that no domain has its UUID (VIR_ERR_NO_DOMAIN): a persistent domain, stopped or
not, and a running transient one are kept; any other error (libvirtd gone, a dead connection) keeps everything.
Each domain is swept under its check lock (a check in flight finishes first) and looked up again under it.
Files written outside that lock (the hook's record, the boot-channel record written before the domain is
defined, quarantine markers) are kept while younger than GRACE_SECONDS: a domain defined again with the same
UUID right now may be writing them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from hostguard.errors import FormatError, HostguardError
from hostguard.host import libvirt
from hostguard.host.locks import domain_lock
from hostguard.host.statedir import StateDir, safe_uuid
from hostguard.poststart.disk_stage import HELD_DIR
from hostguard.poststart.sticky import QUARANTINE, STICKY_DIR

log = logging.getLogger("hostguard.poststart.forget")
GRACE_SECONDS = 300.0
MAX_PER_SWEEP = 4096  # domains looked up by one sweep (one libvirt call each); the rest wait for the next one
LOCK_WAIT = 5.0  # seconds: a domain whose check holds its lock longer is swept next time

# (directory, file-name suffix, written outside the domain's check lock: kept while young)
_KINDS: tuple[tuple[str, str, bool], ...] = (
    ("domains", ".json", True),
    ("bootchannel", ".json", True),
    (QUARANTINE, "", True),
    ("verdicts", ".json", False),
    (STICKY_DIR, ".json", False),
    (HELD_DIR, "", False),
)
_LOCKS = "disk-locks"


def is_gone(conn: libvirt.Connection, uuid: str) -> bool:
    """True only when libvirt answers that no domain has this UUID; any other failure is no evidence."""
    try:
        conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)
    except HostguardError:
        return False
    return False


def _files_of(state_dir: Path, uuid: str) -> list[tuple[Path, bool]]:
    return [(state_dir / d / f"{uuid}{suffix}", young_kept) for d, suffix, young_kept in _KINDS]


def known_uuids(state_dir: Path) -> set[str]:
    """UUIDs that have a file of their own under the state directory (temp files and odd names left out)."""
    found: set[str] = set()
    for directory, suffix, _ in (*_KINDS, (_LOCKS, ".lock", False)):
        try:
            names = os.listdir(state_dir / directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(".") or not name.endswith(suffix):
                continue
            stem = name[: len(name) - len(suffix)] if suffix else name
            try:
                found.add(safe_uuid(stem))
            except FormatError:
                continue
    return found


def forget_domain(state_dir: Path, conn: libvirt.Connection, uuid: str, now: float | None = None) -> list[Path]:
    """Remove this domain's files if libvirt no longer knows it. Returns what was removed."""
    if not is_gone(conn, uuid):
        return []
    removed: list[Path] = []
    with domain_lock(state_dir, uuid, timeout=LOCK_WAIT):
        if not is_gone(conn, uuid):  # defined again while we waited for its lock
            return []
        now = time.time() if now is None else now
        kept_young = False
        for path, young_kept in _files_of(state_dir, uuid):
            try:
                if young_kept and now - path.lstat().st_mtime < GRACE_SECONDS:
                    kept_young = True
                    continue
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                continue
        if not kept_young:  # last, while we hold it: a waiter for it notices and takes a new one
            lock = StateDir(state_dir).disk_locks / f"{uuid}.lock"
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def forget_gone_domains(
    state_dir: Path, conn: libvirt.Connection, uuids: Iterable[str] | None = None, now: float | None = None
) -> list[str]:
    """Sweep the given domains (default: every domain with a file here, at most MAX_PER_SWEEP of them). Stops
    at the first sign that the connection is lost. Returns the UUIDs whose files were removed."""
    candidates = sorted(known_uuids(state_dir) if uuids is None else set(uuids))
    if len(candidates) > MAX_PER_SWEEP:
        log.info("%d domains have state files: %d looked at now, the rest later", len(candidates), MAX_PER_SWEEP)
    forgotten: list[str] = []
    for uuid in candidates[:MAX_PER_SWEEP]:
        if libvirt.connection_lost(conn):
            break
        try:
            if forget_domain(state_dir, conn, uuid, now):
                forgotten.append(uuid)
        except TimeoutError:
            continue  # its check holds the lock: next time
        except OSError as exc:
            log.warning("state files of removed domain %s: %s", uuid, exc.strerror)
    if forgotten:
        log.info("removed the state files of %d domain(s) libvirt no longer knows: %s", len(forgotten), forgotten)
    return forgotten
