"""hostguardd: check every running domain in scope after it starts, and act on what it finds.

Triggers: the STARTED lifecycle event (boot, restore, incoming migration), RESUMED after a migration, a
notification from the hook over the daemon's root-only Unix socket, every running domain when the daemon (re)
connects to libvirtd, and a periodic interval. Checks run on a small bounded pool of workers fed by a queue
that holds each domain at most once, so a burst of starts costs bounded memory and CPU.

Quarantine (`on_start = "quarantine"`): a started domain is suspended at once and resumed only after a pass;
the marker file state/quarantine/UUID makes a crashed daemon finish that job after its restart.

Sticky holds (hostguard.poststart.sticky, ADR 0020): a domain hostguard paused (failed verdict, quarantine) that
anyone resumes is paused again at its RESUMED event; a held domain that starts again is quarantined. A guest
started paused (Nova's way) is checked again at its first resume, once its vCPUs run.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from hostguard.errors import ConfigError, HostguardError
from hostguard.host import libvirt
from hostguard.host.config import Config, load_config
from hostguard.host.heap import limit_arenas, release_free_memory
from hostguard.host.libvirt import open_connection, start_event_loop
from hostguard.host.systemd import service_ready
from hostguard.memory.live import forget_guest
from hostguard.owner.bootchannel import Paths, forget_undefined, load_record
from hostguard.owner.collector import collect
from hostguard.poststart.daemonstatus import last_host_error, write_host_error
from hostguard.poststart.digestkeeper import start_keeper
from hostguard.poststart.disk_stage import resume_held, resume_held_domain
from hostguard.poststart.enforce import check_and_enforce, enforce
from hostguard.poststart.forget import GRACE_SECONDS, forget_gone_domains
from hostguard.poststart.hooksocket import serve_hook_socket
from hostguard.poststart.memory_stage import release_memory_holds
from hostguard.poststart.metrics import Metrics
from hostguard.poststart.stall import call_within
from hostguard.poststart.sticky import held, reassert, reassert_all
from hostguard.poststart.sweeps import sweep_dead_temp_files, sweep_stale_dumps
from hostguard.poststart.verdicts import Verdict

log = logging.getLogger("hostguard.poststart.daemon")
RECONNECT_BACKOFF = (0.5, 1, 2, 5)
KERNEL_WAIT_RETRIES = (20.0, 60.0)  # seconds after a STARTED-time check that found no booted kernel yet
STARTING_UP_RETRY = 0.5  # seconds: a domain caught while libvirt is still starting it is looked at again
# A main-loop call unanswered this long is taken for a wedged client connection (ADR 0024 §8): libvirtd itself
# waits 30 s at most for a domain's job lock.
LIBVIRT_STALL_SECONDS = 90.0
NOTIFY_LOOKUP_SECONDS = 5.0
MAX_ABANDONED = 8  # wedged connections kept (never closed: closing one blocks too); then the daemon exits


def _kernel_not_up_yet(verdict: Verdict) -> bool:
    return any("no VMCOREINFO" in (note.found or "") for note in verdict.notes)


class Daemon:
    def __init__(self, config: Config, uri: str = "qemu:///system") -> None:
        config.finding_policy()  # a broken [findings] table stops the daemon here, with one line
        self.config = config
        self.uri = uri
        self.queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self.pending: dict[str, str] = {}  # domains queued for a check, with the trigger it will record
        self.given_up: dict[str, threading.Thread] = {}  # checks past their deadline, still blocked (by domain)
        self.pending_lock = threading.Lock()
        self.stop = threading.Event()
        self.disconnected = threading.Event()
        self.conn: libvirt.Connection | None = None
        self.metrics = Metrics(config)
        self.quarantine_dir = config.state_dir / "quarantine"
        self.side_jobs = threading.BoundedSemaphore(4)
        self.host_error = last_host_error(config.state_dir)  # an earlier daemon's: a clean check clears it
        self.status_lock = threading.Lock()  # workers report at once; one writer of the status file at a time
        self.started_paused: set[str] = set()  # started paused and not resumed since: checked at first resume
        self.sweep_timer: threading.Timer | None = None
        self.libvirt_stall_seconds = LIBVIRT_STALL_SECONDS
        self.abandoned: list[libvirt.Connection] = []  # wedged connections, referenced so that nothing closes them

    @property
    def connection(self) -> libvirt.Connection:
        if self.conn is None:
            raise ConfigError(f"not connected to libvirt at {self.uri}")
        return self.conn

    # --- queue --------------------------------------------------------------------------------------------

    def enqueue(self, uuid: str, trigger: str) -> None:
        with self.pending_lock:
            if uuid in self.pending:
                # One queued check answers both; it records the event that came last (a block job's READY after
                # a kernel-wait retry was queued), never the periodic tick over an event.
                if trigger != "interval":
                    self.pending[uuid] = trigger
                return
            if self._still_blocked(uuid):
                return  # its check is still blocked: another would block beside it (one thread per domain)
            self.pending[uuid] = trigger
        self.queue.put((uuid, trigger))

    def _still_blocked(self, uuid: str) -> bool:
        """Whether the domain's last check was given up and its thread is still blocked (under pending_lock)."""
        stuck = self.given_up.get(uuid)
        if stuck is not None and not stuck.is_alive():
            del self.given_up[uuid]
            return False
        return stuck is not None

    def enqueue_all_running(self, trigger: str) -> None:
        for dom in self.connection.listAllDomains(1):  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
            if self.config.exemption_for(dom.name()) is None:
                self.enqueue(dom.UUIDString(), trigger)

    # --- libvirt events -----------------------------------------------------------------------------------

    def _on_lifecycle(
        self, _conn: libvirt.Connection, dom: libvirt.Domain, event: int, detail: int, _opaque: Any
    ) -> None:
        name, uuid = dom.name(), dom.UUIDString()
        if self.config.exemption_for(name) is not None:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            self._note_started_paused(dom)
            if self.config.on_start == "quarantine" or held(self.config.state_dir, uuid) is not None:
                self._quarantine(dom)
            self.enqueue(uuid, "started")
            self._spawn(self._collect_owner_token, uuid)
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            forget_guest(uuid)  # what the memory stage kept about this run of the guest
            self.started_paused.discard(uuid)
        elif event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
            self._spawn(self._forget_bootchannel)
            self._spawn(self._forget_domain, uuid)
        elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            self._on_resumed(dom, detail)

    # --- sticky holds (hostguard.poststart.sticky) -----------------------------------------------------------

    def _on_resumed(self, dom: libvirt.Domain, detail: int) -> None:
        """Runs in libvirt's event thread, at once: a held domain is paused (or destroyed) again before anything
        else; otherwise a guest started paused gets its check now that it runs."""
        uuid = dom.UUIDString()
        try:
            acted = reassert(self.config, dom, "resumed")
        except Exception:  # an event callback must never take the daemon down (logged with traceback)
            log.exception("re-holding %s after its resume failed", dom.name())
            acted = None
        if acted is None and uuid in self.started_paused:
            self.started_paused.discard(uuid)
            self.enqueue(uuid, "resumed")
        if detail == libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED:
            self.enqueue(uuid, "migrated")

    def _note_started_paused(self, dom: libvirt.Domain) -> None:
        try:
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                self.started_paused.add(dom.UUIDString())
        except libvirt.libvirtError:
            pass  # gone already

    def _forget_domain(self, uuid: str) -> None:
        """An undefined domain's state files (its hold among them) go with it; files kept for being young are
        swept once they no longer are (one pending sweep of every domain, whatever the number of undefines)."""
        forget_gone_domains(self.config.state_dir, self.connection, [uuid])
        with self.pending_lock:
            if self.sweep_timer is not None and self.sweep_timer.is_alive():
                return
            self.sweep_timer = threading.Timer(GRACE_SECONDS + 1, self._spawn, args=(self.sweep_gone_domains,))
            self.sweep_timer.daemon = True
        self.sweep_timer.start()

    def sweep_gone_domains(self) -> None:
        """State files of domains libvirt no longer knows (hostguard.poststart.forget)."""
        try:
            forget_gone_domains(self.config.state_dir, self.connection)
        except Exception:  # the daemon must go on whatever it finds there (logged with traceback)
            log.exception("removing the state files of removed domains failed")

    def reassert_holds(self) -> None:
        try:
            reassert_all(self.config, self.connection)
        except Exception:  # the daemon must start whatever it finds (logged with traceback)
            log.exception("re-holding held domains failed")

    # --- owner boot channel (hostguard.owner) -----------------------------------------------------------

    def _spawn(self, target: Any, *args: Any) -> None:
        """Side jobs that wait on a guest (up to minutes) run beside the check workers, a few at a time."""

        def run() -> None:
            with self.side_jobs:
                try:
                    target(*args)
                except Exception:  # a side job must never take the daemon down (logged with traceback)
                    log.exception("%s failed", getattr(target, "__name__", "side job"))

        threading.Thread(target=run, name="side-job", daemon=True).start()

    def _owner_paths(self) -> Any:

        return Paths(state_dir=self.config.state_dir)

    def _collect_owner_token(self, uuid: str) -> None:
        """Relay the VM's public-key hash back to the owner (and shred K once the VM used it)."""

        paths = self._owner_paths()
        if load_record(paths, uuid) is None:
            return  # no boot channel attached to this domain
        try:
            collect(self.connection, uuid, paths, timeout=120, audit_log=self.config.audit_log)
        except HostguardError as exc:
            log.warning("boot channel of %s: %s", uuid, exc)

    def _forget_bootchannel(self) -> None:

        forget_undefined(self.connection, self._owner_paths())

    def _quarantine(self, dom: libvirt.Domain) -> None:
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.quarantine_dir / dom.UUIDString()).touch()
        try:
            if dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING:
                dom.suspend()
        except libvirt.libvirtError as exc:
            log.error("quarantine of %s failed: %s", dom.name(), exc)

    def _on_device_added(self, _conn: libvirt.Connection, dom: libvirt.Domain, device: str, _opaque: Any) -> None:
        # A hot-plug never passes through the hook: check the domain again now.
        if self.config.exemption_for(dom.name()) is None:
            self.enqueue(dom.UUIDString(), f"device-added:{device}")

    # --- block-graph events (issue 14): media, device removal and block jobs change what QEMU reads -----------

    def _graph_changed(self, dom: libvirt.Domain, trigger: str) -> None:
        """QEMU's block graph changed without the hook: check the domain now (queued at most once)."""
        if self.config.exemption_for(dom.name()) is None:
            self.enqueue(dom.UUIDString(), trigger)

    def _on_tray_change(
        self, _conn: libvirt.Connection, dom: libvirt.Domain, dev_alias: str, reason: int, _opaque: Any
    ) -> None:
        # `virsh change-media` opens the tray, swaps the medium, closes it: the close event sees the new medium.
        self._graph_changed(dom, f"tray-change:{dev_alias}:{'open' if reason == 0 else 'close'}")

    def _on_device_removed(self, _conn: libvirt.Connection, dom: libvirt.Domain, dev_alias: str, _opaque: Any) -> None:
        self._graph_changed(dom, f"device-removed:{dev_alias}")

    def _on_block_job(
        self, _conn: libvirt.Connection, dom: libvirt.Domain, disk: str, job: int, status: int, _opaque: Any
    ) -> None:
        # A job's READY (a copy's mirror in place), COMPLETED (pivot, commit), FAILED or CANCELED each leave a
        # different graph behind; libvirt sends no event when a job starts.
        self._graph_changed(dom, f"block-job:{disk}:{job}:{status}")

    def _register_graph_events(self, conn: libvirt.Connection) -> None:
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_TRAY_CHANGE, self._on_tray_change, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None)

    def _on_close(self, _conn: libvirt.Connection, reason: int, _opaque: Any) -> None:
        log.warning("libvirt connection closed (reason %d): reconnecting", reason)
        self.disconnected.set()

    def connect(self) -> None:
        for attempt in range(10_000):
            if self.stop.is_set():
                return
            try:
                conn = open_connection(self.uri)
                break
            except Exception as exc:  # noqa: BLE001 - any failure to connect means: wait and retry
                delay = RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)]
                log.warning("cannot connect to %s (%s); retrying in %ss", self.uri, exc, delay)
                time.sleep(delay)
        self.conn = conn
        self.disconnected.clear()
        conn.registerCloseCallback(self._on_close, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device_added, None)
        self._register_graph_events(conn)
        # No client keepalive (ADR 0024 §8): libvirt 9.0's client crashed or wedged when its keepalive closed the
        # connection under calls in flight. A local socket gets EOF when libvirtd dies; a libvirtd that stops
        # answering is outlasted by the stall bound on the main loop's calls.
        conn.setKeepAlive(-1, 0)
        log.info("connected to %s", self.uri)

    # --- checks -------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        while not self.stop.is_set():
            try:
                uuid, trigger = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self.pending_lock:
                trigger = self.pending.pop(uuid, trigger)
                blocked = self._still_blocked(uuid)
            try:
                if blocked:
                    # Queued while its check ran, before that check was given up: a new check would block beside
                    # the stuck one, hold the worker for another deadline and suspend the guest again.
                    log.warning("check of %s not started: its given-up check is still blocked", uuid)
                    continue
                self.check_bounded(uuid, trigger)
                release_free_memory()
            except Exception:
                log.exception("check of %s failed unexpectedly", uuid)
            finally:
                self.queue.task_done()

    def check_bounded(self, uuid: str, trigger: str) -> None:
        """`check` in a thread of its own, waited for at most `[daemon] check_deadline_seconds`. A read blocked on
        hung storage (a FUSE or NFS server that stopped answering) does not return, not even for a signal: such
        a check is given up rather than waited for, so that the worker goes on to the other domains (ADR 0024)."""
        done = threading.Event()

        def run() -> None:
            try:
                self.check(uuid, trigger)
            except Exception:
                log.exception("check of %s failed unexpectedly", uuid)
            finally:
                done.set()

        conn = self.conn
        thread = threading.Thread(target=run, name=f"check-{uuid[:8]}", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.config.check_deadline_seconds
        while not done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            if any(c is conn for c in self.abandoned):
                # blocked on a wedged connection: the reconnect re-checks every domain on the new one
                log.warning("check of %s was waiting on an abandoned libvirt connection: left behind", uuid)
                return
        else:
            return
        with self.pending_lock:
            self.given_up[uuid] = thread
        self.give_up(uuid, trigger)

    def give_up(self, uuid: str, trigger: str) -> None:
        """A check past its deadline: resume the domain if it holds it suspended, record a host error (the guest
        was not judged: `on_host_error` applies), and say so in the status. The domain is checked again once
        the blocked thread ends."""
        seconds = f"{self.config.check_deadline_seconds:g}"
        log.error("check of %s did not finish within %s s: given up (blocked on hung storage?)", uuid, seconds)
        try:
            dom = self.connection.lookupByUUIDString(uuid)
            resume_held_domain(self.connection, self.config.state_dir, uuid)
            reason = (
                f"host error, the guest was not judged: its check did not finish within {seconds} s (blocked "
                "reading its disks? a hung file system) and was given up"
            )
            status = "error" if dom.isActive() else "gone"
            action = self.config.on_host_error if status == "error" else "none"
            verdict = Verdict(
                domain=dom.name(), uuid=uuid, status=status, action=action, reason=reason, trigger=trigger
            )
            self.apply(dom, verdict)
        except Exception:  # the worker must go on to the other domains whatever happens here (logged)
            log.exception("giving up the check of %s failed", uuid)

    def check(self, uuid: str, trigger: str) -> Verdict | None:
        try:
            dom = self.connection.lookupByUUIDString(uuid)
            if not dom.isActive():
                return None
            state, reason = dom.state()
        except libvirt.libvirtError:
            return None  # gone meanwhile
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_STARTING_UP:
            # libvirt is still setting the domain up (QEMU may not hold its disks yet): look once it is done.
            self.check_later(uuid, trigger, STARTING_UP_RETRY)
            return None

        quarantined = self.quarantine_dir / uuid
        me = threading.current_thread()

        def given_up() -> bool:
            with self.pending_lock:
                return self.given_up.get(uuid) is me

        verdict = check_and_enforce(
            self.config, dom, trigger, resume_on_pass=quarantined.exists(), observe=self.metrics.observe,
            given_up=given_up,
        )  # fmt: skip
        if given_up():
            return verdict  # not acted on (check_and_enforce); the domain is checked again now the thread ends
        quarantined.unlink(missing_ok=True)
        self.note_host_error(verdict)
        if _kernel_not_up_yet(verdict):
            # Checked before the guest kernel published VMCOREINFO (e.g. at STARTED): look again a bit later.
            attempt = int(trigger.rsplit("-", 1)[1]) if trigger.startswith("kernel-wait-") else 0
            if attempt < len(KERNEL_WAIT_RETRIES):
                self.check_later(uuid, f"kernel-wait-{attempt + 1}", KERNEL_WAIT_RETRIES[attempt])
        return verdict

    def apply(self, dom: libvirt.Domain, verdict: Verdict) -> None:
        """Enforce a verdict reached outside `check` (tests, `daemon --once` paths) the way `check` does."""
        quarantined = self.quarantine_dir / verdict.uuid
        enforce(self.config, dom, verdict, resume_on_pass=quarantined.exists(), observe=self.metrics.observe)
        quarantined.unlink(missing_ok=True)
        self.note_host_error(verdict)

    def note_host_error(self, verdict: Verdict) -> None:
        """The daemon's own health for `hostguard status`: a host error (trust store, state directory) while
        checking is said there, with since when, until a check runs without one."""

        error = verdict.reason if verdict.reason.startswith("host error") else None
        with self.status_lock:
            if error == self.host_error or (error is None and verdict.status == "error"):
                return
            self.host_error = error
            write_host_error(self.config.state_dir, error)
        if error is not None:
            log.error("host error; running guests are not judged until it is fixed: %s", error)

    # --- hook notifications -------------------------------------------------------------------------------

    def _on_notification(self, data: bytes) -> None:
        try:
            event = json.loads(data.decode("utf-8", "replace").splitlines()[0])
            name = str(event["domain"])
        except (ValueError, KeyError, IndexError, TypeError):
            return
        if self.config.exemption_for(name) is not None:
            return  # out of scope, as for libvirt's own events (another hook may notify about any domain)
        conn = self.conn
        if event.get("event") in ("started", "reconnect") and conn is not None:
            try:
                # bounded: this thread serves every hook; libvirt's own STARTED event also queues the check
                finished, uuid = call_within(
                    NOTIFY_LOOKUP_SECONDS, lambda: conn.lookupByName(name).UUIDString(), "hook-lookup"
                )
            except Exception:  # noqa: BLE001 - the domain may be gone; events also come from libvirt
                log.debug("notification for unknown domain %s", name)
                return
            if finished and uuid is not None:
                self.enqueue(uuid, f"hook-{event['event']}")

    # --- main loop ----------------------------------------------------------------------------------------

    def resume_held(self) -> None:
        """Domains a killed daemon left suspended for a disk check: resumed (each is then checked again)."""

        try:
            resume_held(self.connection, self.config.state_dir)
            release_memory_holds(self.config, self.connection)  # ... and paused for a memory walk
        except Exception:  # the daemon must start whatever it finds there (logged with traceback)
            log.exception("resuming domains held by an interrupted check failed")

    def resume_interrupted_quarantines(self) -> None:
        if not self.quarantine_dir.is_dir():
            return
        for marker in self.quarantine_dir.iterdir():
            self.enqueue(marker.name, "quarantine-recovery")

    def run(self, once: bool = False) -> None:
        limit_arenas()  # before any thread starts: a long run's resident memory stays flat (hostguard.host.heap)
        keeper = start_keeper(self.config)  # image digests that survive `touch` (ADR 0021)
        try:
            self._run(once)
        finally:
            if keeper is not None:
                keeper.close()  # rows removed before their leases are released

    def _run(self, once: bool) -> None:
        start_event_loop()
        workers = [
            threading.Thread(target=self._worker, name=f"check-{i}", daemon=True)
            for i in range(self.config.daemon_workers)
        ]
        for w in workers:
            w.start()
        threading.Thread(
            target=serve_hook_socket,
            args=(self.config.daemon_socket, self.stop, self._on_notification),
            name="hook-socket",
            daemon=True,
        ).start()
        self.connect()
        self.resume_held()
        self.reassert_holds()
        self.sweep_gone_domains()
        sweep_dead_temp_files(self.config.state_dir)
        sweep_stale_dumps(self.config.state_dir)
        self.resume_interrupted_quarantines()
        try:
            self.enqueue_all_running("daemon-start")
        except libvirt.libvirtError as exc:  # libvirtd went away again: the main loop reconnects
            log.warning("cannot list the running domains (%s); reconnecting", exc)
            self.disconnected.set()
        if once:
            self.queue.join()
            self.stop.set()
            return

        # READY=1 for Type=notify; WATCHDOG=1 while libvirt's event loop turns
        service_ready(self.stop, libvirt.event_loop_age)
        while not self.stop.is_set():
            woken = self.disconnected.wait(timeout=self.config.check_interval_seconds)
            if self.stop.is_set():
                break
            self.turn(woken)

    def turn(self, woken: bool) -> None:
        """One turn of the main loop: reconnect if the connection is gone, else queue the periodic checks. A libvirt
        call that fails here (the connection died under it: libvirtd restarted or killed) is logged, and the next
        turn sees the connection lost; it used to end the daemon. A call that does not return at all (a wedged
        libvirt client) is not waited for: its connection is abandoned."""
        try:
            # Asked at every turn, not only told by the close callback: libvirt did not always call it (ADR 0024 §7).
            conn = self.conn
            finished, lost = call_within(self.libvirt_stall_seconds, lambda: libvirt.connection_lost(conn), "turn")
            if not finished:
                self.abandon(conn, "asking whether the connection is alive")
                return
            if woken or lost:
                self.reconnect()
                return
            finished, _ = call_within(self.libvirt_stall_seconds, self._periodic, "turn")
            if not finished:
                self.abandon(conn, "listing the running domains")
        except libvirt.libvirtError as exc:
            log.warning("libvirt call failed (%s); checking the connection at the next turn", exc)
            if libvirt.connection_lost(self.conn):
                self.disconnected.set()

    def _periodic(self) -> None:
        self.enqueue_all_running("interval")
        sweep_stale_dumps(self.config.state_dir)

    def abandon(self, conn: libvirt.Connection | None, doing: str) -> None:
        """A connection whose call never returned: left as it is (closing it would block too), the next turn
        connects anew and re-checks every domain. Past MAX_ABANDONED the daemon exits with an error: its service
        manager starts it afresh (Restart=on-failure), which resumes what it held."""
        if conn is None or conn is not self.conn:
            return
        self.abandoned.append(conn)
        self.conn = None
        log.error(
            "libvirt: no answer for %g s while %s (a wedged libvirt client connection): connecting anew",
            self.libvirt_stall_seconds, doing,
        )  # fmt: skip
        if len(self.abandoned) > MAX_ABANDONED:
            log.critical("libvirt: %d connections wedged; exiting to be restarted", len(self.abandoned))
            os._exit(1)
        self.disconnected.set()

    def reconnect(self) -> None:
        """After the connection to libvirtd was lost (libvirtd restarted or killed, or the connection wedged):
        connect again, resume what a check held suspended when its resume went down with the old connection
        (the guest would stay paused: the next check finds it paused and leaves it so), re-check every domain."""
        self.connect()
        conn = self.conn
        finished, _ = call_within(self.libvirt_stall_seconds, self._after_reconnect, "reconnect")
        if not finished:
            self.abandon(conn, "re-checking after a reconnect")

    def _after_reconnect(self) -> None:
        self.resume_held()
        self.reassert_holds()  # resumes while disconnected sent no event to us (ADR 0020)
        self.sweep_gone_domains()  # undefines while disconnected sent no event either
        self.enqueue_all_running("reconnect")

    def shutdown(self) -> None:
        """Stop from a signal handler: wake the main loop, which otherwise sleeps for the check interval."""
        self.stop.set()
        self.disconnected.set()

    def check_later(self, uuid: str, trigger: str, delay: float) -> None:
        timer = threading.Timer(delay, self.enqueue, args=(uuid, trigger))
        timer.daemon = True
        timer.start()


def run_daemon(config_path: Path | None = None, *, once: bool = False) -> int:
    import faulthandler
    import signal

    config = load_config(config_path)
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, lambda *_: daemon.shutdown())
    # `kill -USR1` prints every thread's stack to the daemon's log (stderr): what a stuck daemon is waiting on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        daemon.run(once=once)
    except KeyboardInterrupt:
        daemon.shutdown()
    return 0
