"""Sticky holds: a domain hostguard paused stays paused until an admin releases it (issue 15, ADR 0020).

libvirt has no resume hook, and a pause is not sticky by itself: `virsh resume`, Nova's `resume()` after a start
paused, or `nova unpause` let a guest that failed its check run again. So a hold is a marker in the state
directory, written before the pause it stands for:

    sticky/UUID.json    a non-pass verdict paused (or destroyed) the domain; `action` says what a resume gets
    quarantine/UUID     `hostguard start` or `on_start = "quarantine"`: paused until its first check passes

On the RESUMED event of a held domain the daemon applies the hold's action at once (`reassert`), with one audit
line for the resume it saw and one for what it did, each with its time. A hold outlives the domain's stop: the
next start is quarantined until its check passes. It ends with a passing verdict (the evidence for it is gone),
with the domain's undefinition (its state files go: hostguard.poststart.forget), or with `hostguard release
DOMAIN --reason TEXT` (`release`), which lets the domain run until its next check.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hostguard.errors import ConfigError, HostguardError
from hostguard.host import libvirt
from hostguard.host.audit import write_audit
from hostguard.host.config import Config
from hostguard.host.fsutil import atomic_write
from hostguard.host.statedir import StateDir, safe_uuid

log = logging.getLogger("hostguard.poststart.sticky")
STICKY_DIR = "sticky"
QUARANTINE = "quarantine"  # its marker is an empty file (hostguard.poststart.daemon)
MAX_REASON = 500


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def sticky_path(state_dir: Path, uuid: str) -> Path:
    return state_dir / STICKY_DIR / f"{safe_uuid(uuid)}.json"


def quarantine_path(state_dir: Path, uuid: str) -> Path:
    return StateDir(state_dir).quarantine / safe_uuid(uuid)


def hold(state_dir: Path, name: str, uuid: str, *, action: str, reason: str) -> None:
    """Record, durably and before the pause it stands for, that hostguard holds this domain."""
    doc = {"domain": name, "uuid": uuid, "action": action, "reason": reason[:300], "since": time.time()}
    path = sticky_path(state_dir, uuid)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {path.parent}: {exc.strerror}") from None
    atomic_write(path, json.dumps(doc).encode(), mode=0o600, error=ConfigError)


def quarantine(state_dir: Path, uuid: str) -> None:
    """The quarantine marker (paused until a check passes), written before the domain is started or suspended."""
    path = quarantine_path(state_dir, uuid)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise ConfigError(f"cannot write the quarantine marker {path}: {exc.strerror}") from None


def held(state_dir: Path, uuid: str) -> dict[str, Any] | None:
    """The hold on this domain, if any: the sticky record, else a quarantine (action pause)."""
    try:
        doc = json.loads(sticky_path(state_dir, uuid).read_bytes())
        if isinstance(doc, dict) and doc.get("action") in ("pause", "destroy"):
            return doc
        log.error("sticky hold of %s is malformed; holding it paused", uuid)
        return {"uuid": uuid, "action": "pause", "reason": "malformed hold record", "since": 0.0}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # unreadable: still a hold (fail closed), with the default action
        log.error("sticky hold of %s unreadable (%s); holding it paused", uuid, exc)
        return {"uuid": uuid, "action": "pause", "reason": "unreadable hold record", "since": 0.0}
    if quarantine_path(state_dir, uuid).exists():
        return {"uuid": uuid, "action": "pause", "reason": "quarantined until its check passes", "since": 0.0}
    return None


def clear(state_dir: Path, uuid: str) -> bool:
    """Drop both markers; True if there was one."""
    had = False
    for path in (sticky_path(state_dir, uuid), quarantine_path(state_dir, uuid)):
        try:
            path.unlink()
            had = True
        except FileNotFoundError:
            pass
    return had


def held_uuids(state_dir: Path) -> set[str]:
    out = {p.stem for p in (state_dir / STICKY_DIR).glob("*.json")}
    quarantined = StateDir(state_dir).quarantine
    if quarantined.is_dir():
        out.update(p.name for p in quarantined.iterdir() if not p.name.startswith("."))
    return out


# --- the daemon's reaction ---------------------------------------------------------------------------------------


def reassert(config: Config, dom: libvirt.Domain, seen: str, seen_at: float | None = None) -> str | None:
    """Apply the hold's action to a held domain that runs (`seen` says how we learnt it ran: "resumed" for the
    RESUMED event, "found-running" at the daemon's start). Returns the action taken, None if none was due.

    A domain that is not running (a late event of our own resume, or paused meanwhile) is left as it is."""
    seen_at = time.time() if seen_at is None else seen_at
    uuid = dom.UUIDString()
    hold_doc = held(config.state_dir, uuid)
    if hold_doc is None:
        return None
    try:
        if dom.info()[0] != libvirt.VIR_DOMAIN_RUNNING:
            return None
    except libvirt.libvirtError:
        return None  # gone meanwhile
    action = str(hold_doc["action"])
    base = {"domain": dom.name(), "uuid": uuid, "hold": hold_doc.get("reason", ""), "held_since": hold_doc["since"]}
    write_audit(
        config.audit_log,
        {"operation": "held-domain-running", "seen": seen, "at": _iso(seen_at), **base},
        to_syslog=config.syslog,
    )
    try:
        if action == "destroy":
            dom.destroy()
        else:
            dom.suspend()
        done, result = time.time(), "ok"
    except libvirt.libvirtError as exc:
        done, result = time.time(), f"failed: {exc.get_error_message()}"
    write_audit(
        config.audit_log,
        {
            "operation": "held-domain-" + ("destroyed" if action == "destroy" else "paused"),
            "at": _iso(done),
            "after_ms": round((done - seen_at) * 1000, 1),
            "result": result,
            **base,
        },
        to_syslog=config.syslog,
    )
    level = logging.WARNING if result == "ok" else logging.ERROR
    log.log(level, "%s: held by hostguard but %s: %s %s", dom.name(), seen, action, result)
    return action


def reassert_all(config: Config, conn: libvirt.Connection) -> list[str]:
    """At the daemon's (re)connection: held domains that run (resumed while no event reached us) get their
    hold's action. Holds of domains that no longer exist go with their other state files
    (hostguard.poststart.forget). Returns the names acted on."""
    acted: list[str] = []
    for uuid in sorted(held_uuids(config.state_dir)):
        try:
            dom = conn.lookupByUUIDString(uuid)
        except (libvirt.libvirtError, HostguardError):
            continue
        if reassert(config, dom, "found-running") is not None:
            acted.append(dom.name())
    return acted


# --- `hostguard release` -----------------------------------------------------------------------------------------


def check_reason(reason: str) -> str:
    text = " ".join(reason.split())
    if not text:
        raise ConfigError("release needs a --reason: say why the domain may run")
    if len(text) > MAX_REASON or not text.isprintable():
        raise ConfigError(f"--reason must be one printable line of at most {MAX_REASON} characters")
    return text


def release(config: Config, dom: libvirt.Domain, reason: str, by: str) -> str:
    """The admin's explicit act: drop the hold, audit it, resume the domain if it is paused. Returns what was done.

    The audit line is written before the hold goes: a release that cannot be recorded does not happen."""
    uuid = dom.UUIDString()
    hold_doc = held(config.state_dir, uuid)
    if hold_doc is None:
        raise ConfigError(f"{dom.name()} is not held by hostguard: nothing to release")
    problem = write_audit(
        config.audit_log,
        {
            "operation": "release",
            "domain": dom.name(),
            "uuid": uuid,
            "reason": reason,
            "by": by,
            "hold": hold_doc.get("reason", ""),
            "held_since": hold_doc["since"],
            "at": _iso(time.time()),
        },
        to_syslog=config.syslog,
    )
    if problem is not None:
        raise ConfigError(f"{problem}: {dom.name()} stays held")
    clear(config.state_dir, uuid)
    try:
        if dom.isActive() and dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
            return "released and resumed"
    except libvirt.libvirtError as exc:
        raise ConfigError(f"{dom.name()} released but not resumed: {exc.get_error_message()}") from None
    return "released"


def who() -> str:
    """The admin behind the command (sudo's caller when there is one), for the audit line."""
    user = os.environ.get("SUDO_USER") or ""
    try:
        import pwd

        uid = os.getuid()
        name = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        name = str(os.getuid())
    return f"{user} (via sudo as {name})" if user else name
