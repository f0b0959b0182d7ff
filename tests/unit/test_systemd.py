"""sd_notify, the watchdog and journald's native protocol, against fake sockets in a temp directory."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostguard.host import systemd
from hostguard.host.audit import write_audit
from tests.testbed.prereq import require_module


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def decode_journal(data: bytes) -> list[tuple[str, str]]:
    """systemd.journal-native(7), the reader's side."""
    fields = []
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, data = rest[8 : 8 + size], rest[8 + size + 1 :]
        fields.append((key.decode(), value.decode()))
    return fields


def test_notify_sends_to_a_path_and_to_an_abstract_socket(dgram: tuple[str, socket.socket]) -> None:
    path, sock = dgram
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1"
    name = f"hostguard-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        assert systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(4096) == b"WATCHDOG=1"


def test_notify_outside_systemd_is_a_no_op() -> None:
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative"})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify.sock"})


def test_watchdog_interval_from_the_environment() -> None:
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not for us
    assert systemd.watchdog_seconds({}) is None
    assert systemd.watchdog_seconds({"WATCHDOG_USEC": "0"}) is None


def run_for(seconds: float, interval: float, loop_age: float) -> list[str]:
    sent: list[str] = []
    stop = threading.Event()

    def send(state: str) -> bool:
        sent.append(state)
        return True

    thread = threading.Thread(target=systemd.run_watchdog, args=(stop, interval, lambda: loop_age, send))
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(5)
    return sent


def test_watchdog_pings_while_the_event_loop_turns() -> None:
    sent = run_for(0.6, 0.2, loop_age=0.0)
    assert sent.count("WATCHDOG=1") >= 3 and sent[-1] == "STOPPING=1"


def test_watchdog_stops_pinging_when_the_event_loop_is_stuck() -> None:
    # systemd then kills and restarts the service after WatchdogSec.
    assert run_for(0.6, 0.2, loop_age=60.0) == ["STOPPING=1"]


def test_heartbeat_comes_from_libvirts_event_loop() -> None:
    require_module("libvirt")
    from hostguard.host.libvirt import event_loop_age, start_event_loop

    start_event_loop()
    age = event_loop_age(0.05)
    time.sleep(0.5)
    assert age() < 0.3


def test_service_ready_then_watchdog_then_stopping(dgram: tuple[str, socket.socket]) -> None:
    require_module("libvirt")
    from hostguard.host.libvirt import event_loop_age, start_event_loop

    start_event_loop()
    path, sock = dgram
    stop = threading.Event()
    systemd.service_ready(stop, event_loop_age, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    assert sock.recv(4096).startswith(b"READY=1\n")
    assert sock.recv(4096) == b"WATCHDOG=1"
    stop.set()
    while (msg := sock.recv(4096)) == b"WATCHDOG=1":
        pass
    assert msg == b"STOPPING=1"


def test_journal_encoding_of_multiline_values() -> None:
    data = systemd.journal_encode([("MESSAGE", "one\ntwo"), ("PRIORITY", "6")])
    assert data == b"MESSAGE\n" + (7).to_bytes(8, "little") + b"one\ntwo\nPRIORITY=6\n"
    assert decode_journal(data) == [("MESSAGE", "one\ntwo"), ("PRIORITY", "6")]


def test_audit_record_goes_to_the_journal_with_structured_fields(
    dgram: tuple[str, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = dgram
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", path)
    record = {
        "operation": "post-start-check",
        "domain": "web1",
        "uuid": "dc1efd3f-d54a-4aa1-9a77-c39c9a611ff3",
        "status": "fail",
        "action": "pause",
        "reason": "unsigned disk\nhot-plugged",
        "findings": [{"kind": "disk-added"}, {"kind": "file-changed"}, {"kind": "disk-added"}],
    }
    write_audit(tmp_path / "audit.jsonl", record)
    fields = decode_journal(sock.recv(65536))
    got = dict(fields)
    assert got["SYSLOG_IDENTIFIER"] == "hostguard" and got["PRIORITY"] == "4" and got["SYSLOG_FACILITY"] == "4"
    assert got["HOSTGUARD_DOMAIN"] == "web1" and got["HOSTGUARD_UUID"] == record["uuid"]
    assert got["HOSTGUARD_VERDICT"] == "fail" and got["HOSTGUARD_REASON"] == "unsigned disk\nhot-plugged"
    assert [v for k, v in fields if k == "HOSTGUARD_FINDING_KIND"] == ["disk-added", "file-changed"]
    assert "domain=web1" in got["MESSAGE"]
    assert (tmp_path / "audit.jsonl").read_text().count("\n") == 1  # the file record is written as before


def test_hook_decision_fields_and_syslog_fallback_without_journald(
    dgram: tuple[str, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = dgram
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", path)
    write_audit(tmp_path / "a.jsonl", {"domain": "db", "operation": "prepare", "verdict": "deny", "reason": "x"})
    got = dict(decode_journal(sock.recv(65536)))
    assert got["HOSTGUARD_VERDICT"] == "deny" and got["HOSTGUARD_OPERATION"] == "prepare" and got["PRIORITY"] == "4"
    assert "HOSTGUARD_FINDING_KIND" not in got
    import syslog

    lines: list[tuple[int, str]] = []
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", str(tmp_path / "no-journald"))
    monkeypatch.setattr(syslog, "syslog", lambda level, msg: lines.append((level, msg)))
    write_audit(tmp_path / "a.jsonl", {"domain": "db", "operation": "prepare", "verdict": "allow"})
    assert lines == [(syslog.LOG_INFO, "domain=db operation=prepare verdict=allow")]


def test_journal_logging_handler(dgram: tuple[str, socket.socket]) -> None:
    path, sock = dgram
    logger = logging.getLogger("hostguard.test.journal")
    logger.propagate = False
    logger.addHandler(systemd.journal_handler(path))
    logger.warning("cannot connect to %s", "qemu:///system")
    got = dict(decode_journal(sock.recv(65536)))
    assert got["MESSAGE"] == "cannot connect to qemu:///system" and got["PRIORITY"] == "4"
    assert got["LOGGER"] == "hostguard.test.journal"


def test_watchdog_never_keeps_a_crashed_daemon_alive() -> None:
    # The main thread dies without setting `stop`: the (non-daemon) watchdog thread ends too, STOPPING=1 goes
    # out, and the process exits with the failure for Restart=on-failure to see.
    import subprocess
    import sys

    code = (
        "import threading, sys\n"
        "from hostguard.host.systemd import run_watchdog\n"
        "def send(state):\n    print(state, flush=True); return True\n"
        "threading.Thread(target=run_watchdog, args=(threading.Event(), 0.2, lambda: 0.0, send)).start()\n"
        "raise SystemExit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and done.stdout.splitlines()[-1] == "STOPPING=1", done.stderr
