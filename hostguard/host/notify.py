"""Hook -> daemon notifications over the daemon's root-only Unix socket. Best effort, bounded in time.

When the daemon is down the hook still decides pre-boot alone; the daemon re-checks everything running when
it comes back, so a lost notification delays a post-start check but never skips it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

TIMEOUT_SECONDS = 0.5


def notify_daemon(path: Path, event: dict[str, Any]) -> bool:
    """Send one JSON line; True when the daemon took it."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_SECONDS)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(event).encode() + b"\n")
        except OSError:
            return False
    return True
