"""The daemon's own health, for `hostguard status`: the host error (trust store, state directory) that keeps it
from judging guests, and since when. One small file in the state directory, written atomically."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from hostguard.host.fsutil import atomic_write

log = logging.getLogger("hostguard.poststart.daemon")
STATUS_FILE = "daemon-status.json"  # in the state directory


def last_host_error(state_dir: Path) -> str | None:
    """What the last daemon process reported (None: none, or no readable status)."""
    try:
        error = json.loads((state_dir / STATUS_FILE).read_bytes())["host_error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, str) else None


def write_host_error(state_dir: Path, error: str | None) -> None:
    doc = {"pid": os.getpid(), "host_error": error, "since": time.time()}
    try:
        atomic_write(state_dir / STATUS_FILE, json.dumps(doc).encode(), mode=0o600)
    except Exception as exc:  # noqa: BLE001 - the status is advisory: the log says it too
        log.warning("daemon status not written: %s", exc)


def daemon_host_error(state_dir: Path) -> str | None:
    """The daemon's own problem, said for an admin, when it has one."""
    try:
        doc = json.loads((state_dir / STATUS_FILE).read_bytes())
        error, since = doc["host_error"], float(doc["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not error:
        return None
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    return f"{error} (since {when}; running guests keep their last verdict, new starts are denied)"
