"""Audit records: one JSON object per line in the audit log, and a journal entry (or a syslog line). Never secrets.

The file is opened with O_APPEND for every record and closed again, so logrotate's rename is safe: the next
record goes to a fresh file (hostguard/data/hostguard.logrotate; tests/unit/test_audit_rotation.py).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

TYPE_CHECKING = False  # typing costs milliseconds of every VM start: imported for the type checker only
if TYPE_CHECKING:
    from typing import Any


def write_audit(path: Path, record: dict[str, Any], *, to_syslog: bool = True) -> str | None:
    """Append one record. A single O_APPEND write keeps concurrent hooks' lines whole.

    Returns None when the line is in the log, else why not (also logged): the hook denies a start it cannot
    record. A line cut short by a full disk is taken back, so the log stays whole lines."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()
    problem = None
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            written = os.write(fd, line)
            if written != len(line):  # the disk filled up during the line (the next write would say ENOSPC)
                _take_back(fd, written)
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (the line did not fit)")
        finally:
            os.close(fd)
    except OSError as exc:
        import logging

        # lazy: off the hook's common path (a failure, or journald present)
        from hostguard.host.fsutil import full_filesystem

        full = full_filesystem(path.parent)
        problem = f"cannot write audit log {path}: {exc.strerror}" + (f" ({full})" if full else "")
        logging.getLogger(__name__).error("%s", problem)
    if to_syslog:
        message = " ".join(f"{k}={_syslog_value(v)}" for k, v in record.items() if k != "time")
        warning = record.get("verdict", "") in ("deny", "would-deny") or record.get("status") in ("fail", "error")
        # lazy: off the hook's common path (a failure, or journald present)
        from hostguard.host.systemd import audit_fields, journal_send

        # journald (native, with HOSTGUARD_* fields) when it runs; it forwards to syslog itself. Else syslog.
        if journal_send(audit_fields(record, message, 4 if warning else 6)):
            return problem
        import syslog

        syslog.openlog("hostguard", syslog.LOG_PID, syslog.LOG_AUTH)
        syslog.syslog(syslog.LOG_WARNING if warning else syslog.LOG_INFO, message)
    return problem


def _syslog_value(value: object) -> str:
    """A value that cannot pass for another `key=value` pair or line: plain tokens as they are, anything else
    (spaces, '=', quotes, control characters from a certificate subject) as a JSON string, ASCII only."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=True)
    if text and all(c.isascii() and (c.isalnum() or c in "._:/@+-") for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def _take_back(fd: int, written: int) -> None:
    """Remove the first `written` bytes of a line that did not fit, if nothing was appended after them."""
    end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: right after our piece
    if os.fstat(fd).st_size == end:
        os.ftruncate(fd, end - written)
