"""Hold a running guest still while its kernel's lists are walked, and never leave it held.

`held_for_walk(dom, marker_dir)` is the only place the memory check pauses a guest. It pauses only a guest
that is running (a guest paused by someone else stays as it is, and is not resumed by us), writes a marker
`<marker_dir>/<uuid>.hold` BEFORE pausing, resumes in `finally`, and removes the marker only once the
guest runs again. A timer resumes the guest after `limit` seconds even if the walk is still going (the walk
then reads a running guest, like any unpaused walk; `Hold.cut_short` says so). If the process is killed
in between (SIGKILL, OOM), the marker stays: `release_abandoned_holds(conn, marker_dir)` resumes every
guest whose marker is left by a process that is gone and that is still paused by a client
(`VIR_DOMAIN_PAUSED_USER`). The daemon calls it when it starts, and the memory stage before each check. A
marker names its owner (pid and the process's start time): a hold of a walk still in progress, in this
process or another, is never released by another check (it was, when two guests were checked at once: the
walk's own resume then failed "domain is already running", an `error (pause)` verdict, a guest left paused).
Markers belong in /run (tmpfs): they only matter while the host runs, and the check writes nothing to disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hostguard.errors import HostguardError
from hostguard.host import libvirt
from hostguard.host.digest import process_start_time
from hostguard.record import Record

log = logging.getLogger(__name__)

HOLD_LIMIT = 2.0  # seconds a guest may be held for one walk; a walk takes ~10 ms
MARKER_SUFFIX = ".hold"

_walking: set[str] = set()  # guests whose walk runs in this process now (a marker of ours not here is left over)
_walking_lock = threading.Lock()


class HoldError(HostguardError):
    """The guest could not be paused or resumed."""


class Hold(Record, frozen=False):
    paused: bool = False  # we paused it for the walk (False: it was not running)
    active: bool = False  # paused right now
    seconds: float = 0.0  # from pause to resume, measured
    cut_short: bool = False  # the limit passed and the guest was resumed before the walk ended


def _marker(marker_dir: Path, uuid: str) -> Path:
    if len(uuid) != 36 or not all(c in "0123456789abcdef-" for c in uuid.lower()):
        raise HoldError(f"not a domain UUID: {uuid!r}")
    return marker_dir / f"{uuid.lower()}{MARKER_SUFFIX}"


@contextlib.contextmanager
def held_for_walk(dom: libvirt.Domain, marker_dir: Path, *, limit: float = HOLD_LIMIT) -> Iterator[Hold]:
    """Pause `dom` (a running libvirt virDomain) for the body, at most `limit` seconds (see the docstring)."""
    hold = Hold()
    try:
        running = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    except libvirt.libvirtError as err:
        raise HoldError(f"cannot read the state of {dom.name()}: {err.get_error_message()}") from None
    if not running:
        yield hold
        return
    marker = _marker(marker_dir, dom.UUIDString())
    marker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    uuid = dom.UUIDString().lower()
    with _walking_lock:
        _walking.add(uuid)
    try:
        yield from _hold(dom, marker, hold, limit)
    finally:
        with _walking_lock:
            _walking.discard(uuid)


def _hold(dom: libvirt.Domain, marker: Path, hold: Hold, limit: float) -> Iterator[Hold]:
    marker.write_text(_owner_stamp(os.getpid()) or "")  # the name says which guest, the text whose walk
    lock = threading.Lock()
    started = time.monotonic()

    def resume() -> None:
        with lock:
            if not hold.active:
                return
            try:
                dom.resume()  # libvirtError propagates to the caller (or, from the timer, is logged below)
            except libvirt.libvirtError:
                if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                    raise
                log.warning("%s was resumed by someone else during its memory walk", dom.name())
            hold.active = False
            hold.seconds = time.monotonic() - started
            marker.unlink(missing_ok=True)

    def on_timer() -> None:
        hold.cut_short = True
        try:
            resume()
        except libvirt.libvirtError as err:
            log.error("cannot resume %s after %.1f s: %s", dom.name(), limit, err.get_error_message())

    try:
        dom.suspend()
    except libvirt.libvirtError as err:
        # Perhaps paused, the answer lost with the connection: then the marker stays for release_abandoned_holds.
        if libvirt.suspend_did_not_happen(dom):
            marker.unlink(missing_ok=True)
        raise HoldError(f"cannot pause {dom.name()} for the memory walk: {err.get_error_message()}") from None
    hold.paused = hold.active = True
    timer = threading.Timer(limit, on_timer)
    timer.daemon = True
    timer.start()
    try:
        yield hold
    finally:
        timer.cancel()
        try:
            resume()
        except libvirt.libvirtError as err:
            raise HoldError(f"cannot resume {dom.name()} after the memory walk: {err.get_error_message()}") from None


def _owner_stamp(pid: int) -> str | None:
    """ "<pid> <start time>": a process, told apart from a later one given the same pid."""
    try:
        return f"{pid} {process_start_time(pid)}"
    except (OSError, IndexError, ValueError):
        return None


def _walk_in_progress(marker: Path) -> bool:
    """Is the walk that wrote this marker still going: its process runs and, if that is this process, the walk
    is one of ours now (a hold of ours whose resume failed is left over, and released like a killed one)?"""
    try:
        stamp = marker.read_text().strip()
        pid = int(stamp.split()[0])
    except (OSError, ValueError, IndexError):
        return False  # unreadable or unstamped (older versions): left by a process that is gone
    if _owner_stamp(pid) != stamp:
        return False
    if pid != os.getpid():
        return True
    with _walking_lock:
        return marker.name[: -len(MARKER_SUFFIX)] in _walking


def release_abandoned_holds(conn: libvirt.Connection, marker_dir: Path) -> list[str]:
    """Resume the guests a killed memory check left paused (their markers remain); names of those resumed.
    A marker whose guest is gone or running is removed; a guest paused for another reason is left paused;
    a marker whose owner still runs is a walk in progress, and is left alone."""
    resumed: list[str] = []
    try:
        markers = sorted(marker_dir.glob(f"*{MARKER_SUFFIX}"))
    except OSError:
        return resumed
    for marker in markers:
        uuid = marker.name[: -len(MARKER_SUFFIX)]
        if _walk_in_progress(marker):
            continue
        try:
            dom = conn.lookupByUUIDString(uuid)
            state, reason = dom.state()
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER:
                dom.resume()
                resumed.append(dom.name())
                log.warning("resumed %s: a killed memory check had left it paused", dom.name())
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                log.error("cannot release the memory-check hold of %s: %s", uuid, err.get_error_message())
                continue  # keep the marker: try again next time
        marker.unlink(missing_ok=True)
    return resumed
