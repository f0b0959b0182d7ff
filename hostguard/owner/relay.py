"""The site's relay: expose a VM's owner port (a unix socket of QEMU's) on TCP for the owner.

It copies bytes and nothing else: TLS runs end to end between the owner and the guest agent, so the relay
(like the rest of the host) can neither read the session nor, undetected, substitute its own keys. One owner
connection at a time (the virtio-serial port carries one session); each direction is bounded by the socket
buffers, and an idle connection is dropped after `idle_timeout`.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from pathlib import Path

CHUNK = 65536
log = logging.getLogger(__name__)


def pump(a: socket.socket, b: socket.socket, idle_timeout: float) -> int:
    """Copy both ways until either side closes or nothing moves for `idle_timeout`. Returns bytes copied."""
    total = 0
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        while True:
            events = sel.select(idle_timeout)
            if not events:
                return total
            for key, _ in events:
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                dst: socket.socket = key.data
                try:
                    data = src.recv(CHUNK)
                    if not data:
                        return total
                    dst.sendall(data)
                except OSError:
                    return total
                total += len(data)


class Relay:
    """Listen on TCP `listen`; for each client, connect to `target` (unix socket) and pump."""

    def __init__(self, listen: tuple[str, int], target: Path, *, idle_timeout: float = 300.0) -> None:
        self.target = target
        self.idle_timeout = idle_timeout
        self.server = socket.create_server(listen, family=socket.AF_INET6 if ":" in listen[0] else socket.AF_INET)
        self._stop = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.getsockname()[:2]
        return str(host), int(port)

    def serve(self, max_connections: int | None = None) -> None:
        served = 0
        while not self._stop.is_set() and (max_connections is None or served < max_connections):
            try:
                client, _ = self.server.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            served += 1
            with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
                try:
                    upstream.connect(str(self.target))
                except OSError as exc:  # the domain is down or not attached: drop this client, keep serving
                    log.warning("cannot reach the VM's owner port %s: %s", self.target, exc.strerror)
                    continue
                copied = pump(client, upstream, self.idle_timeout)
                log.info("relayed one owner session (%d bytes)", copied)

    def close(self) -> None:
        self._stop.set()
        self.server.close()
