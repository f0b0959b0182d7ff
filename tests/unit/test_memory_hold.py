"""The only place a memory check pauses a guest (hold.py), against libvirt's test:///default driver: paused for
the body only, resumed on errors and after the time limit, and a hold left by a killed check released."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from hostguard.host.libvirt import Domain
from hostguard.memory.hold import HoldError, held_for_walk, release_abandoned_holds
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")


@pytest.fixture
def conn() -> Iterator[Any]:
    c = libvirt.open("test:///default")
    yield c
    c.close()


def state(dom: Any) -> int:
    return int(dom.state()[0])


def test_paused_for_the_body_only_with_a_marker_meanwhile(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    with held_for_walk(dom, tmp_path) as hold:
        assert state(dom) == libvirt.VIR_DOMAIN_PAUSED
        assert [m.name for m in tmp_path.iterdir()] == [f"{dom.UUIDString()}.hold"]
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and hold.paused and not hold.cut_short
    assert 0 < hold.seconds < 5 and list(tmp_path.iterdir()) == []


def test_an_error_in_the_walk_still_resumes(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    with pytest.raises(RuntimeError), held_for_walk(dom, tmp_path):
        raise RuntimeError("the walk failed")
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []


def test_a_walk_past_the_limit_is_cut_short_and_the_guest_resumed(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    with held_for_walk(dom, tmp_path, limit=0.2) as hold:
        time.sleep(0.6)
        assert state(dom) == libvirt.VIR_DOMAIN_RUNNING  # resumed by the timer while the walk still ran
    assert hold.cut_short and 0.2 <= hold.seconds < 0.6 and list(tmp_path.iterdir()) == []


def test_a_guest_paused_by_someone_else_is_left_as_it_is(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    dom.suspend()
    with held_for_walk(dom, tmp_path) as hold:
        pass
    assert not hold.paused and state(dom) == libvirt.VIR_DOMAIN_PAUSED and list(tmp_path.iterdir()) == []


def test_a_hold_left_by_a_killed_check_is_released(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    # as held_for_walk leaves it when the process is killed between its pause and its resume
    (tmp_path / f"{dom.UUIDString()}.hold").write_text("test\n1\n0\n")
    dom.suspend()
    assert release_abandoned_holds(conn, tmp_path) == ["test"]
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []
    # a stale marker of a running or vanished guest is removed; nothing is resumed without a marker
    (tmp_path / f"{dom.UUIDString()}.hold").write_text("")
    (tmp_path / "00000000-0000-0000-0000-000000000000.hold").write_text("")
    dom.suspend()
    dom.resume()
    assert release_abandoned_holds(conn, tmp_path) == [] and list(tmp_path.iterdir()) == []
    dom.suspend()
    assert release_abandoned_holds(conn, tmp_path) == [] and state(dom) == libvirt.VIR_DOMAIN_PAUSED


def test_a_hold_of_a_walk_in_progress_is_not_released_by_another_check(conn: Any, tmp_path: Path) -> None:
    """Two guests checked at once: the second check's release of abandoned holds saw the first one's marker
    (its walk still going) and resumed that guest; the walk's own resume then failed "domain is already
    running" and the verdict was `error (pause)`: a clean guest left paused (seen booting Debian in CI). A
    marker names its owner: a live owner's hold is left alone, a dead or reused pid's is released."""
    import subprocess
    import sys

    dom = conn.lookupByName("test")
    with held_for_walk(dom, tmp_path):
        assert release_abandoned_holds(conn, tmp_path) == []
        assert state(dom) == libvirt.VIR_DOMAIN_PAUSED  # still held for the walk
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = tmp_path / f"{dom.UUIDString()}.hold"
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    # dead; pid reused by another; this process, whose walk of this guest is over (its resume had failed)
    for stamp in (f"{gone.stdout.strip()} 1", f"{os.getpid()} {int(own) + 1}", f"{os.getpid()} {own}"):
        marker.write_text(stamp)
        dom.suspend()
        assert release_abandoned_holds(conn, tmp_path) == ["test"], stamp
        assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []


def test_a_guest_resumed_by_someone_else_during_the_walk_is_no_error(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")
    with held_for_walk(dom, tmp_path):
        dom.resume()  # virsh resume, meanwhile: the walk's own resume fails "domain is already running"
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []


def test_a_guest_that_cannot_be_paused_is_an_error_without_a_marker(conn: Any, tmp_path: Path) -> None:
    dom = conn.lookupByName("test")

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(dom, name)

        def suspend(self) -> int:
            raise libvirt.libvirtError("refused")

    with pytest.raises(HoldError, match="cannot pause"), held_for_walk(cast(Domain, Refusing()), tmp_path):
        pass
    assert list(tmp_path.iterdir()) == [] and state(dom) == libvirt.VIR_DOMAIN_RUNNING


def test_a_pause_whose_answer_was_lost_with_libvirtd_keeps_its_marker_for_release(conn: Any, tmp_path: Path) -> None:
    """libvirtd killed under the pause: QEMU paused, the answer lost, the state unreadable. The marker stays (it
    was removed: a guest paused by no one), and release_abandoned_holds resumes the guest once libvirtd is back."""
    dom = conn.lookupByName("test")
    lost = [False]

    class KilledUnderPause:
        def __getattr__(self, name: str) -> Any:
            return getattr(dom, name)

        def suspend(self) -> int:
            dom.suspend()
            lost[0] = True
            raise libvirt.libvirtError("End of file while reading data: Input/output error")

        def state(self) -> Any:
            if lost[0]:
                raise libvirt.libvirtError("Cannot write data: Broken pipe")
            return dom.state()

    with pytest.raises(HoldError, match="cannot pause"), held_for_walk(cast(Domain, KilledUnderPause()), tmp_path):
        pass
    assert [m.name for m in tmp_path.iterdir()] == [f"{dom.UUIDString()}.hold"] and state(
        dom
    ) == libvirt.VIR_DOMAIN_PAUSED
    assert release_abandoned_holds(conn, tmp_path) == ["test"]
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and list(tmp_path.iterdir()) == []
