"""The daemon's root-only Unix socket, on which the libvirt hook says a domain started (the hook may not call
libvirt, and libvirt's own STARTED event also reaches the daemon: this only makes the check start sooner)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

MAX_MESSAGE = 4096


def serve_hook_socket(path: Path, stop: threading.Event, on_message: Callable[[bytes], None]) -> None:
    """Accept one message per connection until `stop` is set; each is handed to `on_message` as received."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)  # root only: the hook runs as root
        server.listen(64)
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            with client:
                client.settimeout(1.0)
                try:
                    data = client.recv(MAX_MESSAGE)
                except OSError:
                    continue
            on_message(data)
    path.unlink(missing_ok=True)
