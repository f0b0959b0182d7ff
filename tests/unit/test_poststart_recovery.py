"""What a restarted daemon does with the domains a killed daemon held suspended to read their disks."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from hostguard.host.libvirt import Connection, Domain
from hostguard.poststart.disk_stage import HELD_DIR, resume_held
from tests.testbed.prereq import require_module

if TYPE_CHECKING:
    from hostguard.poststart.daemon import Daemon

libvirt = require_module("libvirt")


@dataclass
class Dom:
    uuid: str
    run_state: int = libvirt.VIR_DOMAIN_PAUSED
    reason: int = libvirt.VIR_DOMAIN_PAUSED_USER
    dom_id: int = 7
    calls: list[str] = field(default_factory=list)

    def name(self) -> str:
        return f"dom-{self.uuid[:4]}"

    def UUIDString(self) -> str:
        return self.uuid

    def state(self) -> list[int]:
        return [self.run_state, self.reason]

    def isActive(self) -> int:
        return int(self.run_state != libvirt.VIR_DOMAIN_SHUTOFF)

    def ID(self) -> int:
        return self.dom_id

    def resume(self) -> None:
        self.calls.append("resume")
        self.run_state = libvirt.VIR_DOMAIN_RUNNING


class Live(Dom):
    """A domain the daemon can record a verdict on."""

    def info(self) -> list[int]:
        return [self.run_state, 0, 0, 1, 0]

    def isPersistent(self) -> int:
        return 0

    def setMetadata(self, *_args: Any) -> None:
        pass


class Conn:
    def __init__(self, *doms: Dom) -> None:
        self.doms = {d.uuid: d for d in doms}

    def lookupByUUIDString(self, uuid: str) -> Dom:
        if uuid not in self.doms:
            raise _no_domain()
        return self.doms[uuid]


def as_connection(*domains: Any) -> Connection:
    """The fake connection, typed as the adapter's protocol (it implements only what resume_held uses)."""
    return cast(Connection, Conn(*domains))


def _no_domain() -> Any:
    err = libvirt.libvirtError("Domain not found")
    err.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", None, None, 0, 0)
    return err


def held(state: Path, uuid: str, dom_id: int = 7) -> Path:
    (state / HELD_DIR).mkdir(parents=True, exist_ok=True)
    marker = state / HELD_DIR / uuid
    marker.write_text(json.dumps({"domain": "x", "id": dom_id, "since": 0, "pid": 1}))
    return marker


def plain_daemon(tmp_path: Path, extra: str = "") -> Daemon:
    """A Daemon on a minimal configuration in `tmp_path` (not started: its methods are driven directly), with
    `extra` TOML appended."""
    from hostguard.host.config import load_config
    from hostguard.poststart.daemon import Daemon

    cfg = tmp_path / "hostguard.toml"
    cfg.write_text(
        f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n'
        f'[audit]\nlog = "{tmp_path / "audit"}"\nsyslog = false\n{extra}'
    )
    return Daemon(load_config(cfg))


ONE_WORKER_1S_DEADLINE = "[daemon]\nworkers = 1\ncheck_deadline_seconds = 1\n"


def test_a_domain_left_suspended_by_a_killed_check_is_resumed(tmp_path: Path) -> None:
    dom = Dom("1111-a")
    marker = held(tmp_path, dom.uuid)
    assert resume_held(as_connection(dom), tmp_path) == [dom.name()]
    assert dom.calls == ["resume"] and not marker.exists()


def test_a_domain_paused_for_a_failed_verdict_has_no_marker_and_stays_paused(tmp_path: Path) -> None:
    failed, looked_at = Dom("2222-f"), Dom("3333-l")
    held(tmp_path, looked_at.uuid)
    assert resume_held(as_connection(failed, looked_at), tmp_path) == [looked_at.name()]
    assert failed.calls == []


def test_a_marker_of_an_earlier_run_of_the_domain_resumes_nothing(tmp_path: Path) -> None:
    """Stopped and started again since (a new libvirt id): its pause now is someone else's."""
    dom = Dom("4444-r", dom_id=9)
    marker = held(tmp_path, dom.uuid, dom_id=7)
    assert resume_held(as_connection(dom), tmp_path) == []
    assert dom.calls == [] and not marker.exists()


def test_a_pause_of_another_kind_is_not_resumed(tmp_path: Path) -> None:
    """Paused by libvirt for an I/O error (or a migration), not by our suspend: not ours to resume."""
    dom = Dom("5555-i", reason=libvirt.VIR_DOMAIN_PAUSED_IOERROR)
    held(tmp_path, dom.uuid)
    assert resume_held(as_connection(dom), tmp_path) == []
    assert dom.calls == []


def test_markers_of_running_and_vanished_domains_are_dropped(tmp_path: Path) -> None:
    running = Dom("6666-r", run_state=libvirt.VIR_DOMAIN_RUNNING)
    held(tmp_path, running.uuid)
    held(tmp_path, "7777-gone")
    assert resume_held(as_connection(running), tmp_path) == []
    assert list((tmp_path / HELD_DIR).iterdir()) == []


def test_a_verdict_that_pauses_takes_over_a_marker_left_by_a_failed_resume(tmp_path: Path) -> None:
    """The resume after the disk check failed (marker kept for recovery), then the verdict is a pause: a restart
    must not resume that guest."""
    from hostguard.host.config import load_config
    from hostguard.poststart.daemon import Daemon
    from hostguard.poststart.verdicts import Verdict

    cfg = tmp_path / "hostguard.toml"
    cfg.write_text(
        f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n'
        f'[audit]\nlog = "{tmp_path / "audit"}"\nsyslog = false\n'
    )
    config = load_config(cfg)
    dom = Dom("8888-p")
    marker = held(config.state_dir, dom.uuid)

    live = Live(dom.uuid)
    verdict = Verdict(domain="d", uuid=dom.uuid, status="fail", action="pause", reason="1 finding(s)", trigger="t")
    Daemon(config).apply(cast(Domain, live), verdict)
    assert not marker.exists()
    assert resume_held(as_connection(live), config.state_dir) == [] and live.calls == []


def test_memory_dumps_left_by_a_killed_check_are_swept_once_stale(tmp_path: Path) -> None:
    """SIGKILL during the memory stage leaves the guest's memory on disk (the dump's own clean-up never ran)."""
    import os

    from hostguard.host.config import load_config
    from hostguard.poststart.sweeps import STALE_DUMP_SECONDS, sweep_stale_dumps

    cfg = tmp_path / "hostguard.toml"
    cfg.write_text(f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n')
    dumps = tmp_path / "state" / "memory" / "dumps"
    dumps.mkdir(parents=True)
    old, fresh, other = dumps / "a-1.core", dumps / "b-2.core", dumps / "notes.txt"
    for p in (old, fresh, other):
        p.write_bytes(b"guest memory")
    now = fresh.stat().st_mtime
    os.utime(old, (now - STALE_DUMP_SECONDS - 1, now - STALE_DUMP_SECONDS - 1))
    os.utime(other, (now - STALE_DUMP_SECONDS - 1, now - STALE_DUMP_SECONDS - 1))
    assert sweep_stale_dumps(load_config(cfg).state_dir, now) == ["a-1.core"]
    assert not old.exists() and fresh.exists() and other.exists()  # one being written stays; not ours stays


def test_temp_files_of_killed_writers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    """SIGKILL during an atomic write (held marker, verdict) leaves `.NAME.tmpPID` beside the whole file."""
    import os

    from hostguard.host.config import load_config
    from hostguard.poststart.sweeps import sweep_dead_temp_files

    cfg = tmp_path / "hostguard.toml"
    cfg.write_text(f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n')
    held, verdicts = tmp_path / "state" / "held", tmp_path / "state" / "verdicts"
    held.mkdir(parents=True)
    verdicts.mkdir()
    dead = 2**22 + 1  # above pid_max's default: no such process
    litter = [held / f".u1.tmp{dead}.140", verdicts / f".u1.json.tmp{dead}"]  # with and without a thread id
    live = verdicts / f".u2.json.tmp{os.getpid()}.7"
    for p in (*litter, live, held / "u3"):
        p.write_text("{}")
    assert sorted(sweep_dead_temp_files(load_config(cfg).state_dir)) == sorted(str(p) for p in litter)
    assert live.exists() and (held / "u3").exists()


def test_a_resume_lost_with_libvirtds_connection_is_done_after_the_reconnect(tmp_path: Path) -> None:
    """libvirtd restarted (or killed) while a disk check held a domain suspended: the check's resume failed with
    the dead connection and left the marker. The reconnect resumes the domain before re-checking everything;
    before, only a daemon start did, and the reconnect's check found the domain paused and left it so."""
    daemon = plain_daemon(tmp_path)
    dom = Dom("9999-c")
    marker = held(daemon.config.state_dir, dom.uuid)

    class Reconnected(Conn):
        def listAllDomains(self, _flags: int) -> list[Dom]:
            return list(self.doms.values())

    daemon.connect = lambda: setattr(daemon, "conn", Reconnected(dom))  # type: ignore[method-assign]
    daemon.reconnect()
    assert dom.calls == ["resume"] and not marker.exists()
    assert daemon.queue.get_nowait() == (dom.uuid, "reconnect")


def test_a_hook_notification_about_an_exempt_domain_checks_nothing(tmp_path: Path) -> None:
    """Exempt domains are out of scope for libvirt's events and the periodic checks, but a hook notification
    ("started") enqueued them anyway: a second guarded set-up's hook on the same host (45-hostguard-soak beside
    50-hostguard, seen on the test host) notified its daemon about every domain, and that daemon paused domains
    it had exempted ("expected a pre-boot verification record, found none")."""
    from hostguard.host.config import load_config
    from hostguard.poststart.daemon import Daemon

    cfg = tmp_path / "hostguard.toml"
    cfg.write_text(
        f'[trust]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path / "state"}"\n'
        f'[policy]\nexempt = ["other-*"]\n[audit]\nlog = "{tmp_path / "audit"}"\nsyslog = false\n'
    )
    daemon = Daemon(load_config(cfg))
    mine, other = Dom("aaaa-m"), Dom("bbbb-o")

    class ByName(Conn):
        def lookupByName(self, name: str) -> Dom:
            return {"mine": mine, "other-1": other}[name]

    daemon.conn = ByName(mine, other)  # type: ignore[assignment]
    daemon._on_notification(b'{"domain": "other-1", "event": "started"}\n')
    daemon._on_notification(b'{"domain": "mine", "event": "started"}\n')
    assert daemon.queue.get_nowait() == (mine.uuid, "hook-started")
    assert daemon.queue.empty()


def test_a_check_blocked_past_its_deadline_is_given_up_and_the_worker_checks_the_others(tmp_path: Path) -> None:
    """A disk image on hung storage: the check's read never returns, not even for a signal. Before, that worker
    was lost for good (2 by default: two such domains and nothing was checked any more) and the domain it held
    suspended stayed paused. Now the worker gives the check up at the deadline: the held domain is resumed, an
    error verdict says why (a host error: `on_host_error`), the next domain is checked, and the blocked domain is
    not queued again until its thread ends."""
    from hostguard.poststart.verdicts import load_verdicts

    daemon = plain_daemon(tmp_path, ONE_WORKER_1S_DEADLINE)

    hung, other = Live("aaaa-h"), Live("bbbb-o", run_state=libvirt.VIR_DOMAIN_RUNNING)
    marker = held(daemon.config.state_dir, hung.uuid)  # its disk stage holds it suspended
    daemon.conn = Conn(hung, other)  # type: ignore[assignment]
    storage = threading.Event()
    checked: list[str] = []

    def check(uuid: str, trigger: str) -> None:
        if uuid == hung.uuid:
            storage.wait()  # the read on hung storage
        checked.append(uuid)

    daemon.check = check  # type: ignore[method-assign]
    worker = threading.Thread(target=daemon._worker, daemon=True)
    worker.start()
    daemon.enqueue(hung.uuid, "interval")
    daemon.enqueue(other.uuid, "interval")
    deadline = time.monotonic() + 20
    while other.uuid not in checked and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checked == [other.uuid]  # the worker went on
    assert hung.calls == ["resume"] and not marker.exists()  # not left paused by the check it could not finish
    verdict = load_verdicts(daemon.config.state_dir)[hung.uuid]
    assert (verdict["status"], verdict["action"]) == ("error", "log")
    assert "its check did not finish within 1 s" in verdict["reason"]
    daemon.enqueue(hung.uuid, "interval")
    assert daemon.queue.empty()  # not queued beside the blocked check
    storage.set()  # the storage answers again
    while hung.uuid not in checked and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.given_up[hung.uuid].join(timeout=5)
    daemon.enqueue(hung.uuid, "interval")
    assert daemon.queue.get_nowait() == (hung.uuid, "interval")  # checked as usual again
    daemon.stop.set()


def test_a_check_queued_before_its_domain_was_given_up_is_not_started_beside_the_blocked_one(tmp_path: Path) -> None:
    """The periodic tick queues a domain again while its check runs (the queue holds each domain once, and the
    running check is no longer in it). Before, once that check was given up, the worker took the entry queued
    meanwhile and started a second check, which blocked beside the first: the worker held for another whole
    deadline, the guest suspended again for it, a second error verdict (tests/faults/test_hangs.py, a guest on
    FUSE storage that hangs, 2026-12-05). Now the worker drops an entry whose domain's check is still blocked."""
    from hostguard.poststart.verdicts import load_verdicts

    daemon = plain_daemon(tmp_path, ONE_WORKER_1S_DEADLINE)
    hung, other = Live("aaaa-h"), Live("bbbb-o", run_state=libvirt.VIR_DOMAIN_RUNNING)
    daemon.conn = Conn(hung, other)  # type: ignore[assignment]
    storage = threading.Event()
    started: list[str] = []

    def check(uuid: str, trigger: str) -> None:
        started.append(uuid)
        if uuid == hung.uuid:
            storage.wait()  # the read on hung storage

    daemon.check = check  # type: ignore[method-assign]
    threading.Thread(target=daemon._worker, daemon=True).start()
    daemon.enqueue(hung.uuid, "interval")
    deadline = time.monotonic() + 20
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.enqueue(hung.uuid, "interval")  # the next tick, while the check is blocked but not yet given up
    daemon.enqueue(other.uuid, "interval")
    while other.uuid not in started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started == [hung.uuid, other.uuid]  # no second check of the blocked domain before the other one
    daemon.queue.join()
    assert started == [hung.uuid, other.uuid]
    assert "did not finish within 1 s" in load_verdicts(daemon.config.state_dir)[hung.uuid]["reason"]
    storage.set()
    daemon.stop.set()


def test_a_given_up_check_that_ends_after_all_is_not_acted_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hung storage that fails for good: the blocked read finally raises EIO, long after the check was given up
    (its error verdict recorded, the guest resumed). Before, that late outcome was acted on: "check failed:
    [Errno 5] …" with the policy's action (pause) on a guest read while it ran, and its verdict replaced the
    give-up's (noticed with tests/faults/test_hangs.py). Now it is logged and dropped; the next tick checks anew."""
    from hostguard.poststart import enforce as enforce_module
    from hostguard.poststart.verdicts import Verdict, load_verdicts
    from tests.unit.libvirt_fakes import FakeDomain, FakeHost

    daemon = plain_daemon(tmp_path, ONE_WORKER_1S_DEADLINE)
    hung = FakeDomain()
    daemon.conn = cast(Connection, FakeHost(hung))
    storage, ended = threading.Event(), threading.Event()

    def check_domain(config: Any, dom: Any, trigger: str) -> Verdict:
        storage.wait()  # the read on hung storage; then it fails
        ended.set()
        reason = "check failed: [Errno 5] Input/output error"
        return Verdict(
            domain=dom.name(), uuid=dom.UUIDString(), status="fail", action="pause", reason=reason, trigger=trigger
        )

    monkeypatch.setattr(enforce_module, "check_domain", check_domain)
    threading.Thread(target=daemon._worker, daemon=True).start()
    daemon.enqueue(hung.uuid, "interval")
    deadline = time.monotonic() + 20
    while hung.uuid not in daemon.given_up and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.queue.join()
    given_up = load_verdicts(daemon.config.state_dir)[hung.uuid]
    assert "did not finish within 1 s" in given_up["reason"]
    storage.set()
    daemon.given_up[hung.uuid].join(timeout=5)
    assert ended.is_set() and not daemon.given_up[hung.uuid].is_alive()
    assert "suspend" not in hung.calls and hung.run_state == libvirt.VIR_DOMAIN_RUNNING
    assert load_verdicts(daemon.config.state_dir)[hung.uuid] == given_up
    daemon.stop.set()


def test_a_disk_hold_released_by_the_daemon_is_not_resumed_again_by_its_late_check(tmp_path: Path) -> None:
    """The daemon gave the check up and released its hold (`resume_held_domain`: resumed, marker removed); the
    guest was paused again since (an admin, a verdict). The late check's own resume must not release that."""
    from hostguard.poststart.disk_stage import held_still, resume_held_domain
    from tests.unit.libvirt_fakes import FakeDomain, FakeHost

    dom = FakeDomain()
    with held_still(dom, tmp_path):
        assert resume_held_domain(cast(Connection, FakeHost(dom)), tmp_path, dom.uuid) == "fake"
        dom.suspend()  # `virsh suspend`, meanwhile
    assert dom.calls == ["suspend", "resume", "suspend"] and dom.run_state == libvirt.VIR_DOMAIN_PAUSED


def test_a_connection_closed_without_the_close_callback_is_seen_as_lost() -> None:
    """After a keepalive timeout libvirt closed the daemon's connection without calling its close callback: the
    main loop now also asks the connection itself at every tick, and reconnects."""
    from hostguard.host.libvirt import connection_lost

    class Closed:
        def isAlive(self) -> int:
            return 0

    class Broken:
        def isAlive(self) -> int:
            raise libvirt.libvirtError("internal error: client socket is closed")

    assert connection_lost(None) and connection_lost(cast(Connection, Closed()))
    assert connection_lost(cast(Connection, Broken()))


def test_a_libvirt_call_failing_in_the_main_loop_leads_to_a_reconnect_not_the_daemons_end(tmp_path: Path) -> None:
    """libvirtd stopped (SIGSTOP) past the keepalive while the main loop listed the running domains: the call
    raised "connection closed due to keepalive timeout" out of the loop and ended the daemon (seen in
    tests/faults/test_libvirtd.py). Now the turn logs it and the next one reconnects and re-checks everything."""
    daemon = plain_daemon(tmp_path)
    dom = Dom("9999-d")

    class Dying(Conn):
        alive = 1

        def listAllDomains(self, _flags: int) -> list[Dom]:
            self.alive = 0  # what libvirt reports once the keepalive closed the socket
            raise libvirt.libvirtError("internal error: connection closed due to keepalive timeout")

        def isAlive(self) -> int:
            return self.alive

    class Reconnected(Conn):
        def listAllDomains(self, _flags: int) -> list[Dom]:
            return list(self.doms.values())

        def isAlive(self) -> int:
            return 1

    daemon.conn = Dying(dom)  # type: ignore[assignment]
    daemon.connect = lambda: setattr(daemon, "conn", Reconnected(dom))  # type: ignore[method-assign]
    daemon.turn(woken=False)
    assert daemon.queue.empty() and daemon.disconnected.is_set()
    daemon.turn(woken=daemon.disconnected.is_set())
    assert daemon.queue.get_nowait() == (dom.uuid, "reconnect")


def test_a_wedged_libvirt_connection_is_abandoned_and_a_new_one_used(tmp_path: Path) -> None:
    """libvirt 9.0's client was seen wedged after a keepalive timeout (libvirtd SIGSTOPped with calls in flight):
    every call on the connection waited forever, the main loop's among them, and no guest was checked again
    (tests/faults/test_libvirtd.py). A call unanswered past the stall time now abandons the connection: never
    closed, the next turn connects anew and re-checks every domain; a check blocked on it frees its worker."""
    daemon = plain_daemon(tmp_path)
    daemon.libvirt_stall_seconds = 0.2
    dom = Dom("7777-w")
    never = threading.Event()

    class Wedged(Conn):
        def listAllDomains(self, _flags: int) -> list[Dom]:
            never.wait()
            return []

        def lookupByUUIDString(self, uuid: str) -> Dom:
            never.wait()
            return dom

        def isAlive(self) -> int:
            return 1

    class Fresh(Conn):
        def listAllDomains(self, _flags: int) -> list[Dom]:
            return list(self.doms.values())

        def isAlive(self) -> int:
            return 1

    wedged = Wedged(dom)
    daemon.conn = wedged  # type: ignore[assignment]
    daemon.resume_held = daemon.reassert_holds = daemon.sweep_gone_domains = lambda: None  # type: ignore[method-assign]
    daemon.connect = lambda: setattr(daemon, "conn", Fresh(dom))  # type: ignore[method-assign]
    checking = threading.Thread(target=daemon.check_bounded, args=(dom.uuid, "interval"), daemon=True)
    checking.start()  # blocks in lookupByUUIDString on the wedged connection
    started = time.monotonic()
    daemon.turn(woken=False)
    assert time.monotonic() - started < 5
    assert daemon.conn is None and daemon.abandoned == [cast(Connection, wedged)] and daemon.disconnected.is_set()
    checking.join(timeout=5)
    assert not checking.is_alive()  # its worker is free again
    daemon.turn(woken=daemon.disconnected.is_set())
    assert isinstance(daemon.conn, Fresh) and daemon.abandoned == [cast(Connection, wedged)]
    assert daemon.queue.get_nowait() == (dom.uuid, "reconnect")
    never.set()


def test_a_queued_check_records_the_event_that_came_last_but_not_the_periodic_tick(tmp_path: Path) -> None:
    """A block job's READY while a kernel-wait retry of the same domain was still queued: one check answers
    both, and its verdict names the block job (it named the retry, and a test waiting for the block-job verdict
    timed out under load). The periodic tick never hides an event."""
    daemon = plain_daemon(tmp_path)
    daemon.enqueue("u-1", "kernel-wait-1")
    daemon.enqueue("u-1", "block-job:vda:4:2")
    daemon.enqueue("u-1", "interval")
    assert daemon.queue.qsize() == 1
    checked: list[tuple[str, str]] = []
    daemon.check_bounded = lambda uuid, trigger: checked.append((uuid, trigger))  # type: ignore[method-assign]
    worker = threading.Thread(target=daemon._worker, daemon=True)
    worker.start()
    daemon.queue.join()
    daemon.stop.set()
    worker.join(timeout=5)
    assert checked == [("u-1", "block-job:vda:4:2")] and daemon.pending == {}
