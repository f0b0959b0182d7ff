"""Faults injected into a guarded host (real libvirtd, the installed hook, the daemon, TCG busybox guests).

Each case states the fault, how it is injected, and what must hold; docs/reliability.md lists what was observed.
Guests are started paused wherever the fault is about the start decision (the hook runs all the same), so only
the cases about running guests cost a TCG boot.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon import DaemonProcess, config_with, wait_verdict
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require_module

REPO = Path(__file__).resolve().parents[2]
libvirt = require_module("libvirt")


def start_paused(dom: Any) -> str | None:
    """Start the domain paused (the hook decides as for any start); libvirt's error text when it is refused."""
    try:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as err:
        return str(err)
    return None


def denial(text: str | None) -> str:
    assert text is not None, "the domain started, but hostguard should have refused it"
    assert "hostguard: denied" in text, text
    line = text[text.index("hostguard: denied") :].strip()
    assert "\n" not in line
    return line


@contextlib.contextmanager
def config_replaced(host: GuardedHost, old: str, new: str) -> Iterator[None]:
    """The hook (which reads its config at each run) runs with `old` replaced by `new` in hostguard.toml."""
    original = host.config.read_text()
    assert old in original, old
    host.config.write_text(original.replace(old, new, 1))
    try:
        yield
    finally:
        host.config.write_text(original)


def state_dir_at(host: GuardedHost, directory: Path) -> contextlib.AbstractContextManager[None]:
    """The hook and the daemons use `directory` as the state directory."""
    return config_replaced(host, f'dir = "{host.state}"', f'dir = "{directory}"')


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (a loop device would do too: tmpfs needs no image file)."""
    where.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "hgt-faults", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(directory: Path) -> list[Path]:
    """Fill the file system holding `directory` to the last block (then small files, till none fits)."""
    fillers = [directory / "filler"]
    subprocess.run(["dd", "if=/dev/zero", f"of={fillers[0]}", "bs=64k"], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        while True:
            fillers.append(directory / f"filler-{len(fillers)}")
            fillers[-1].write_bytes(b"\0" * 4096)
    assert shutil.disk_usage(directory).free == 0
    return fillers


def integrity(db: Path, *, immutable: bool = True) -> tuple[str, list[tuple[str, int]]]:
    # immutable: no lock, no -shm/-wal left behind whose space a later writer could reuse on the full disk
    # (only where every writer closed cleanly: it ignores a WAL a killed process left)
    uri = f"file:{db}?immutable=1" if immutable else f"file:{db}"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        versions = sorted(conn.execute("SELECT name, version FROM versions").fetchall())
    return ok, versions


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hostguard.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


# --- (5) the state directory on a full file system ----------------------------------------------------------


def test_full_state_filesystem_denies_starts_saying_so_and_loses_nothing(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    small = host.dir / "small-state"
    with small_filesystem(small, "2m"), state_dir_at(host, small / "state"):
        first = libvirt_env.define_guest("full-a", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "a.qcow2"))
        assert start_paused(first) is None  # recorded: the database, the domain record
        first.destroy()
        before = integrity(small / "state" / "state.db")
        assert before == ("ok", [("busybox", 1)])
        fillers = fill(small)

        overlay = libvirt_env.overlay(signed_base, "b.qcow2")
        second = libvirt_env.define_guest("full-b", busybox_guest, disk_path=overlay)
        line = denial(start_paused(second))
        print(f"full disk: {line}")
        assert f"state directory {small / 'state'} is unusable: the file system holding it ({small}) is full" in line
        assert not second.isActive()
        assert integrity(small / "state" / "state.db") == before  # nothing already recorded was harmed

        for filler in fillers:
            filler.unlink(missing_ok=True)  # space returns: the next start is decided as usual
        assert start_paused(second) is None
        assert integrity(small / "state" / "state.db") == before
        records = [r for r in host.audit_records() if r.get("domain") == second.name()]
        assert [r["verdict"] for r in records] == ["deny", "allow"]


def audit_log_at(host: GuardedHost, path: Path) -> contextlib.AbstractContextManager[None]:
    return config_replaced(host, f'log = "{host.audit_log}"', f'log = "{path}"')


def test_full_audit_filesystem_denies_a_start_it_cannot_record_and_tears_no_line(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    small = host.dir / "small-audit"
    with small_filesystem(small, "1m"), audit_log_at(host, small / "audit.jsonl"):
        first = libvirt_env.define_guest(
            "afull-a", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "c.qcow2")
        )
        assert start_paused(first) is None
        first.destroy()
        fillers = fill(small)
        # The log's last page still has room (tmpfs allocates whole pages): fill it with whole JSON lines too,
        # leaving less than a decision's line. That line then gets written in part: it must be taken back.
        log = small / "audit.jsonl"
        pad = b'{"operation": "padding"}\n'
        room = -log.stat().st_size % 4096
        with log.open("ab") as fh:
            fh.write(pad * (room // len(pad)))
        assert -log.stat().st_size % 4096 < len(pad)

        overlay = libvirt_env.overlay(signed_base, "d.qcow2")
        second = libvirt_env.define_guest("afull-b", busybox_guest, disk_path=overlay)
        line = denial(start_paused(second))
        print(f"audit log full: {line}")
        assert "the decision cannot be recorded: cannot write audit log" in line
        assert f"the file system holding it ({small}) is full" in line
        assert not second.isActive()
        lines = (small / "audit.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]  # every line whole
        assert [r["domain"] for r in records if r.get("operation") == "prepare"] == [first.name()]

        for filler in fillers:
            filler.unlink(missing_ok=True)
        assert start_paused(second) is None
        records = [json.loads(x) for x in (small / "audit.jsonl").read_text().splitlines()]
        assert [(r["domain"], r["verdict"]) for r in records if r.get("operation") == "prepare"] == [
            (first.name(), "allow"),
            (second.name(), "allow"),
        ]


# --- (6) the state database deleted or corrupted -------------------------------------------------------------


def test_deleted_or_corrupted_state_database_denies_starts_and_says_how_to_recover(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    """A lost rollback high-water mark must not silently let an older version start."""
    state = host.dir / "state-lost"
    v2 = host.publish(busybox_guest, "busybox", 2, filename="busybox-v2.qcow2")
    with state_dir_at(host, state):
        newer = libvirt_env.define_guest("lost-v2", busybox_guest, disk_path=libvirt_env.overlay(v2, "v2.qcow2"))
        assert start_paused(newer) is None
        newer.destroy()
        older = libvirt_env.define_guest(
            "lost-v1", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "v1.qcow2")
        )
        assert "rollback" in denial(start_paused(older))  # the high-water mark at work

        for path in state.glob("state.db*"):
            path.unlink()  # deleted (an admin's cleanup, a bad restore)
        line = denial(start_paused(older))
        print(f"deleted: {line}")
        assert "state database" in line and "is missing, but this host created one" in line
        assert "rollback high-water marks are lost" in line and "removing" in line
        assert not (state / "state.db").exists()  # not silently recreated

        (state / "state.db").write_bytes(b"\x00garbage\xff" * 4096)  # corrupted
        line = denial(start_paused(older))
        print(f"corrupted: {line}")
        assert "file is not a database" in line and "restore the state directory from a backup" in line

        # The recovery the line names, done: the loss accepted, starts are decided again (from no history).
        (state / "state.db").rename(state / "state.db.broken")
        (state / "state.created").unlink()
        assert start_paused(older) is None
        assert integrity(state / "state.db")[1] == [("busybox", 1)]


# --- (2) the daemon SIGKILLed while it holds a domain ----------------------------------------------------------


def _kill_when(daemon: DaemonProcess, condition: Any, timeout: float, settle: float = 0.1) -> float:
    """SIGKILL the daemon at a moment `condition()` holds; returns when that was.

    Seeing the condition and killing are two steps, and a short hold (a disk check holds a domain ~60 ms) can end
    between them. So the daemon is stopped first (SIGSTOP), given `settle` seconds for a libvirt call it had
    already sent to land, and killed only if the condition still holds; otherwise it is let go and watched
    again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGSTOP)
            time.sleep(settle)
            if not condition():
                daemon.proc.send_signal(signal.SIGCONT)
                continue
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            daemon.proc = None
            return time.time()
        time.sleep(0.002)
    pytest.fail("the daemon never reached the point to kill it at")


def test_daemon_killed_while_holding_a_domain_for_its_disk_check_resumes_it_after_restart(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    config = config_with(host, "held", "memory_check = false\ncheck_interval_seconds = 2")
    dom = libvirt_env.boot("held", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "held.qcow2"))
    marker = host.state / "held" / dom.UUIDString()
    daemon = DaemonProcess(host, config)
    daemon.start()
    try:

        def held() -> bool:
            return marker.exists() and bool(dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED)

        _kill_when(daemon, held, timeout=120)
        assert dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]  # left held
        t = time.time()
        daemon.start()
        verdict = wait_verdict(host, dom, t, trigger="daemon-start")
        assert verdict["status"] == "pass", verdict
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert not marker.exists()
        assert "resumed; a check interrupted by the daemon's end held it suspended" in daemon.log.read_text()
    finally:
        daemon.kill()


# --- (4) the trust store broken while guests run -------------------------------------------------------------


def test_trust_store_broken_while_a_guest_runs_denies_starts_and_pauses_no_guest(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    config = config_with(host, "trust", "memory_check = false")
    dom = libvirt_env.boot("trust", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "trust.qcow2"))
    assert run_cli("daemon", "--once", "--config", str(config)).returncode == 0
    assert json.loads((host.state / "verdicts" / f"{dom.UUIDString()}.json").read_text())["status"] == "pass"
    root = host.trust / "roots" / "root.pem"
    good = root.read_bytes()
    try:
        root.write_bytes(b"\x00not a certificate\xff" * 64)  # overwritten with garbage
        other = libvirt_env.define_guest(
            "trust-new", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "n.qcow2")
        )
        line = denial(start_paused(other))
        assert "trust directory" in line or "root" in line, line
        done = run_cli("daemon", "--once", "--config", str(config))
        assert done.returncode == 0, done.stderr[-2000:]
        verdict = json.loads((host.state / "verdicts" / f"{dom.UUIDString()}.json").read_text())
        print(f"trust store broken: {verdict['status']} ({verdict['action']}): {verdict['reason']}")
        assert (verdict["status"], verdict["action"]) == ("error", "log")
        assert verdict["reason"].startswith("host error, the guest was not judged: ")
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # not paused, neither to look nor as a verdict
        status = run_cli("status", "--config", str(config)).stdout
        assert status.startswith("daemon: host error, the guest was not judged: "), status
        assert "new starts are denied" in status.splitlines()[0]
    finally:
        root.write_bytes(good)
    assert run_cli("daemon", "--once", "--config", str(config)).returncode == 0
    assert json.loads((host.state / "verdicts" / f"{dom.UUIDString()}.json").read_text())["status"] == "pass"
    assert not run_cli("status", "--config", str(config)).stdout.startswith("daemon:")


def test_daemon_killed_at_random_points_of_its_checks_strands_no_guest_and_tears_no_state(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    """SIGKILL 15 times at random moments while checks run back to back (every second): whatever point each kill
    hit (preparing, holding the domain, writing the verdict), the guest ends running and checked, and every
    state file is whole."""
    import random

    config = config_with(host, "random", "memory_check = false\ncheck_interval_seconds = 1")
    dom = libvirt_env.boot("random", busybox_guest, disk_path=libvirt_env.overlay(signed_base, "random.qcow2"))
    daemon = DaemonProcess(host, config)
    rng = random.Random(20)
    held_at_kill = 0
    try:
        for _ in range(15):
            daemon.start()
            time.sleep(rng.uniform(0.8, 3.0))
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            daemon.proc = None
            held_at_kill += dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        t = time.time()
        daemon.start()
        verdict = wait_verdict(host, dom, t, trigger="daemon-start")
        assert verdict["status"] == "pass", verdict
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        daemon.kill()
    for path in (host.state / "verdicts").glob("*.json"):  # (a dot-file is a temp file, not a verdict)
        json.loads(path.read_text())  # whole, never torn
    assert integrity(host.state / "state.db", immutable=False)[0] == "ok"
    assert list((host.state / "held").glob("*")) == []
    litter = sorted(p.name for p in host.state.rglob(".*tmp*"))
    print(f"random kills: 15, domain paused at {held_at_kill} of them; temp files left: {litter}")
    assert litter == []  # those of killed writers are swept by the restarted daemon
