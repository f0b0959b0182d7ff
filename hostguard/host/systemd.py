"""systemd without a dependency: sd_notify (READY, WATCHDOG, STOPPING) and journald's native protocol.

Both are datagrams on a Unix socket (sd_notify(3), systemd.journal-native(7)). The hook writes audit records
through `journal_send`, so this module imports only `os` at load time and `_socket` (not `socket`, ~14 ms)
when it sends. Outside systemd every function is a no-op that returns False.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs milliseconds of every VM start: imported for the type checker only
if TYPE_CHECKING:
    import logging
    import threading
    from collections.abc import Callable, Iterable, Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _send_datagram(address: str, data: bytes) -> bool:
    import _socket

    if address.startswith("@"):  # abstract namespace (sd_notify(3))
        address = "\0" + address[1:]
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        sock.settimeout(1.0)
        sock.sendto(data, address)
        return True
    except OSError:
        return False
    finally:
        sock.close()


# --- sd_notify -----------------------------------------------------------------------------------------------


def notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not run by systemd or it failed."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False
    return _send_datagram(address, state.encode())


def watchdog_seconds(env: Mapping[str, str] = os.environ) -> float | None:
    """WatchdogSec= as systemd passes it (WATCHDOG_USEC, for WATCHDOG_PID when set); None when off."""
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def run_watchdog(
    stop: threading.Event,
    interval: float | None,
    loop_age: Callable[[], float],
    send: Callable[[str], bool] = notify,
) -> None:
    """Ping WATCHDOG=1 every interval/2 while the event loop's heartbeat is fresh; STOPPING=1 at the end.
    A loop that stops turning stops the pings, and systemd restarts the service after WatchdogSec. Runs in a
    non-daemon thread (so STOPPING=1 goes out before the process exits) that also ends when the main thread
    has ended, whatever the reason, so it can never keep a failed daemon alive."""
    import threading
    import time

    period = interval / 2 if interval is not None else None
    step = min(1.0, period) if period is not None else 1.0
    next_ping = time.monotonic() + (period or 0.0)
    main = threading.main_thread()
    while not stop.wait(step) and main.is_alive():
        if period is None or time.monotonic() < next_ping:
            continue
        next_ping = time.monotonic() + period
        if loop_age() < period:
            send("WATCHDOG=1")
    send("STOPPING=1")


def service_ready(
    stop: threading.Event,
    loop_age: Callable[[float], Callable[[], float]],
    env: Mapping[str, str] = os.environ,
) -> None:
    """The daemon is connected and checking: READY=1, then the watchdog thread (when WatchdogSec= is set).
    `loop_age(period)` starts the heartbeat of the daemon's event loop (hostguard.host.libvirt.event_loop_age)."""
    if not notify("READY=1\nSTATUS=checking running domains", env):
        return
    import threading

    interval = watchdog_seconds(env)
    age = loop_age(interval / 4) if interval is not None else (lambda: 0.0)

    def send(state: str) -> bool:
        return notify(state, env)

    threading.Thread(target=run_watchdog, args=(stop, interval, age, send), name="sd-watchdog").start()


# --- journald's native protocol -----------------------------------------------------------------------------


def journal_encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """KEY=value lines; a value with a newline goes as KEY, newline, 64-bit LE length, value, newline."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def journal_send(fields: Iterable[tuple[str, str]], socket_path: str | None = None) -> bool:
    """One journal entry; False when journald is not there (the caller falls back to syslog)."""
    path = socket_path or JOURNAL_SOCKET
    if not os.path.exists(path):
        return False
    return _send_datagram(path, journal_encode(fields))


def audit_fields(record: Mapping[str, object], message: str, priority: int) -> list[tuple[str, str]]:
    """An audit record as a journal entry: `journalctl -t hostguard HOSTGUARD_VERDICT=deny`."""
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", "hostguard"),
        ("SYSLOG_FACILITY", "4"),  # auth, as the syslog line has always been
    ]
    verdict = record.get("verdict", record.get("status"))
    for field, value in (
        ("HOSTGUARD_DOMAIN", record.get("domain")),
        ("HOSTGUARD_UUID", record.get("uuid")),
        ("HOSTGUARD_OPERATION", record.get("operation")),
        ("HOSTGUARD_VERDICT", verdict),
        ("HOSTGUARD_ACTION", record.get("action")),
        ("HOSTGUARD_REASON", record.get("reason")),
    ):
        if value not in (None, ""):
            fields.append((field, str(value)))
    findings = record.get("findings")
    if isinstance(findings, list):
        kinds = sorted({str(f["kind"]) for f in findings if isinstance(f, dict) and "kind" in f})
        fields += [("HOSTGUARD_FINDING_KIND", kind) for kind in kinds]  # repeated field: one per kind
    return fields


def journal_handler(socket_path: str | None = None) -> logging.Handler:
    """A logging handler that writes native journal entries (priority and logger name as fields)."""
    import logging

    class JournalHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                message = self.format(record)
            except Exception:  # noqa: BLE001 - logging must never raise into the daemon
                self.handleError(record)
                return
            priority = 3 if record.levelno >= logging.ERROR else 4 if record.levelno >= logging.WARNING else 6
            if record.levelno < logging.INFO:
                priority = 7
            journal_send(
                [
                    ("MESSAGE", message),
                    ("PRIORITY", str(priority)),
                    ("SYSLOG_IDENTIFIER", "hostguard"),
                    ("LOGGER", record.name),
                    ("THREAD", record.threadName or ""),
                ],
                socket_path,
            )

    return JournalHandler()


def stderr_is_journal(env: Mapping[str, str] = os.environ) -> bool:
    """systemd connects stderr to the journal and says so in $JOURNAL_STREAM (device:inode)."""
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return env.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"
