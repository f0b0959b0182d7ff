"""Litter a killed daemon or check leaves in the state directory, removed at the daemon's start and turns."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("hostguard.poststart.daemon")
STALE_DUMP_SECONDS = 900.0  # a memory dump not written to for this long belongs to a check that died


def sweep_dead_temp_files(state_dir: Path) -> list[str]:
    """Temp files (`.NAME.tmpPID[.THREAD]`, hostguard.host.fsutil.atomic_write) of killed writers: the target
    file is whole (old or new), the temp file is litter once its process is gone."""
    removed: list[str] = []
    for directory in (state_dir, *(state_dir / d for d in ("held", "verdicts", "domains"))):
        try:
            for path in directory.glob(".*.tmp*"):
                pid = path.name.rsplit(".tmp", 1)[1].split(".")[0]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    path.unlink(missing_ok=True)
                    removed.append(str(path))
        except OSError as exc:
            log.warning("temp files in %s: %s", directory, exc)
    if removed:
        log.info("removed %d temp file(s) of killed writers: %s", len(removed), removed)
    return removed


def sweep_stale_dumps(state_dir: Path, now: float | None = None) -> list[str]:
    """Remove guest memory dumps a killed check left behind (hostguard.memory.acquire removes its own; a
    SIGKILL does not let it). A dump still being written has a fresh mtime and is left alone."""
    directory = state_dir / "memory" / "dumps"
    removed: list[str] = []
    now = time.time() if now is None else now
    try:
        for path in directory.glob("*.core"):
            if now - path.lstat().st_mtime > STALE_DUMP_SECONDS:
                path.unlink()
                removed.append(path.name)
    except OSError as exc:
        log.warning("stale memory dumps in %s: %s", directory, exc)
    if removed:
        log.warning("removed %d memory dump(s) left by an interrupted check: %s", len(removed), removed)
    return removed
