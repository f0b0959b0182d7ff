"""The sweep of removed domains' state files (hostguard.poststart.forget, issue 20)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from typing import cast

import pytest

from hostguard.domain.record import DomainRecord
from hostguard.host.config import Config
from hostguard.host.libvirt import Connection
from hostguard.host.locks import domain_lock
from hostguard.host.statedir import save_domain_record
from hostguard.poststart import sticky
from hostguard.poststart.daemon import Daemon
from hostguard.poststart.disk_stage import HELD_DIR
from hostguard.poststart.forget import GRACE_SECONDS, forget_gone_domains, known_uuids
from tests.unit.libvirt_fakes import VIR_ERR_SYSTEM_ERROR, FakeDomain, FakeHost, libvirt_error

LATER = GRACE_SECONDS + 1


def leave_state(state: Path, uuid: str) -> list[Path]:
    """Every per-domain file a started, checked, held and undefined domain leaves behind."""
    save_domain_record(state, DomainRecord(uuid=uuid, name="d", disks=()))
    sticky.hold(state, "d", uuid, action="pause", reason="r")
    sticky.quarantine(state, uuid)
    with domain_lock(state, uuid):
        pass
    files = [state / "verdicts" / f"{uuid}.json", state / HELD_DIR / uuid, state / "bootchannel" / f"{uuid}.json"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    made = [p for p in state.rglob("*") if p.is_file() and uuid in p.name]
    assert len(made) == 7  # domains, sticky, quarantine, disk-locks and the three above
    return made


def test_a_removed_domain_loses_every_file_and_existing_ones_keep_theirs(config: Config) -> None:
    state = config.state_dir
    stopped = FakeDomain(domain_name="stopped", gone=True)  # persistent, shut off: still defined
    transient = FakeDomain(domain_name="transient", persistent=False)  # running
    removed = "0b5e0000-0000-4000-8000-00000000dead"
    for uuid in (stopped.uuid, transient.uuid, removed):
        leave_state(state, uuid)
    (state / "verdicts" / ".x.json.tmp1.2").write_text("")  # not a domain's: another sweep's business

    forgotten = forget_gone_domains(state, cast(Connection, FakeHost(stopped, transient)), now=time.time() + LATER)

    assert forgotten == [removed]
    assert known_uuids(state) == {stopped.uuid, transient.uuid}
    assert not [p for p in state.rglob("*") if removed in p.name]
    assert len([p for p in state.rglob("*") if transient.uuid in p.name]) == 7


def test_a_libvirt_error_other_than_no_domain_keeps_everything(config: Config) -> None:
    state = config.state_dir
    uuids = ["0b5e0000-0000-4000-8000-000000000001", "0b5e0000-0000-4000-8000-000000000002"]
    files = [f for u in uuids for f in leave_state(state, u)]
    host = FakeHost()
    host.down = True  # libvirtd gone: every lookup fails, none says "no such domain"
    assert forget_gone_domains(state, cast(Connection, host), now=time.time() + LATER) == []
    assert host.lookups == []  # a lost connection is seen before any lookup

    class Flaky(FakeHost):  # alive, but the lookup fails for another reason
        def lookupByUUIDString(self, uuidstr: str) -> FakeDomain:
            raise libvirt_error(VIR_ERR_SYSTEM_ERROR, "internal error: client socket is closed")

    assert forget_gone_domains(state, cast(Connection, Flaky()), now=time.time() + LATER) == []
    assert all(f.exists() for f in files)


def test_young_files_written_outside_the_lock_are_kept_until_the_grace_ends(config: Config) -> None:
    """A domain defined again with the same UUID may be in its hook right now, writing its record."""
    state = config.state_dir
    uuid = "0b5e0000-0000-4000-8000-000000000003"
    leave_state(state, uuid)
    host = cast(Connection, FakeHost())

    assert forget_gone_domains(state, host) == [uuid]
    left = sorted(p.relative_to(state).as_posix() for p in state.rglob("*") if uuid in p.name)
    assert left == [f"bootchannel/{uuid}.json", f"disk-locks/{uuid}.lock", f"domains/{uuid}.json", f"quarantine/{uuid}"]

    assert forget_gone_domains(state, host, now=time.time() + LATER) == [uuid]
    assert known_uuids(state) == set()


def test_the_undefined_event_forgets_that_domain_and_sweeps_again_after_the_grace(config: Config) -> None:
    state = config.state_dir
    gone, kept = "0b5e0000-0000-4000-8000-000000000004", FakeDomain()
    for uuid in (gone, kept.uuid):
        sticky.hold(state, "d", uuid, action="pause", reason="r")
    daemon = Daemon(config)
    daemon.conn = cast(Connection, FakeHost(kept))
    daemon._forget_domain(gone)
    daemon._forget_domain(gone)  # a second undefine: still one pending sweep
    timer = daemon.sweep_timer
    assert timer is not None and timer.is_alive() and timer.interval == LATER
    timer.cancel()
    assert sticky.held_uuids(state) == {kept.uuid}


def test_a_lock_file_swept_while_another_check_waits_for_it_is_not_held_twice(config: Config) -> None:
    """The waiter had opened the swept file: it must take the file now at the path, or a third check would lock a
    new file beside it and both would run."""
    state, uuid = config.state_dir, "0b5e0000-0000-4000-8000-000000000005"
    path = state / "disk-locks" / f"{uuid}.lock"
    waiting, holding, done = threading.Event(), threading.Event(), threading.Event()

    def waiter() -> None:
        waiting.set()
        with domain_lock(state, uuid, timeout=10):
            holding.set()
            done.wait(10)

    with domain_lock(state, uuid):
        thread = threading.Thread(target=waiter)
        thread.start()
        waiting.wait(5)
        time.sleep(0.2)  # the waiter has opened the file and polls its flock
        path.unlink()
    assert holding.wait(10)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        done.set()
        thread.join()
