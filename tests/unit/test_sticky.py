"""Sticky holds (issue 15 item 6, ADR 0020): a domain hostguard paused, resumed by anyone, is paused again at its
RESUMED event; `hostguard release` is the one audited way out. The daemon's event handlers with fake domains
(the real libvirtd case: tests/integration/test_daemon_sticky.py)."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest

from hostguard.errors import ConfigError
from hostguard.host import libvirt
from hostguard.host.config import Config
from hostguard.host.libvirt import Connection, Domain
from hostguard.poststart import sticky
from hostguard.poststart.daemon import Daemon
from hostguard.poststart.enforce import enforce
from hostguard.poststart.forget import GRACE_SECONDS, forget_gone_domains
from hostguard.poststart.verdicts import Verdict
from tests.testbed.prereq import require_module
from tests.unit.libvirt_fakes import FakeDomain, FakeHost

RESUMED, STARTED = libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_STARTED
UNPAUSED = require_module("libvirt").VIR_DOMAIN_EVENT_RESUMED_UNPAUSED
PAUSED, RUNNING = libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_RUNNING


def audit(config: Config) -> list[dict[str, Any]]:
    if not config.audit_log.exists():
        return []
    return [json.loads(line) for line in config.audit_log.read_text().splitlines()]


def failed(dom: FakeDomain, action: str = "pause") -> Verdict:
    return Verdict(domain=dom.name(), uuid=dom.uuid, status="fail", action=action, reason="1 finding(s)", trigger="t")


def event(daemon: Daemon, dom: FakeDomain, ev: int, detail: int = 0) -> None:
    daemon._on_lifecycle(cast(Connection, None), cast(Domain, dom), ev, detail, None)


def queued(daemon: Daemon) -> list[tuple[str, str]]:
    """What was queued, taken off the queue as the workers do."""
    out = []
    while not daemon.queue.empty():
        out.append(daemon.queue.get_nowait())
        daemon.pending.pop(out[-1][0], None)
    return out


def test_a_domain_paused_for_a_failed_verdict_and_resumed_by_anyone_is_paused_again(config: Config) -> None:
    dom = FakeDomain(domain_name="tampered")
    enforce(config, cast(Domain, dom), failed(dom), resume_on_pass=False)
    assert dom.calls == ["suspend"] and sticky.held(config.state_dir, dom.uuid) is not None
    dom.resume()  # `virsh resume`, Nova's resume(), `nova unpause`
    event(Daemon(config), dom, RESUMED, UNPAUSED)
    assert dom.calls == ["suspend", "resume", "suspend"] and dom.run_state == PAUSED
    seen, again = audit(config)[-2:]
    assert seen["operation"] == "held-domain-running" and seen["seen"] == "resumed"
    assert again["operation"] == "held-domain-paused" and again["result"] == "ok"
    assert again["hold"] == "1 finding(s)" and 0 <= again["after_ms"] < 2000
    assert seen["at"] <= again["at"]


def test_a_clean_domain_an_admin_pauses_and_resumes_is_untouched(config: Config) -> None:
    dom = FakeDomain(domain_name="clean")
    daemon = Daemon(config)
    dom.suspend()
    dom.resume()
    event(daemon, dom, RESUMED, UNPAUSED)
    assert dom.calls == ["suspend", "resume"] and dom.run_state == RUNNING
    assert audit(config) == [] and queued(daemon) == []


def test_release_lets_it_run_with_an_audit_line_and_a_later_resume_is_not_undone(config: Config) -> None:
    dom = FakeDomain(domain_name="tampered")
    enforce(config, cast(Domain, dom), failed(dom), resume_on_pass=False)
    done = sticky.release(config, cast(Domain, dom), "false positive, ticket 42", "alice")
    assert done == "released and resumed" and dom.run_state == RUNNING
    line = audit(config)[-1]
    assert (line["operation"], line["reason"], line["by"], line["domain"]) == (
        "release", "false positive, ticket 42", "alice", "tampered"
    )  # fmt: skip
    event(Daemon(config), dom, RESUMED, UNPAUSED)  # the release's own resume
    assert dom.run_state == RUNNING and audit(config)[-1]["operation"] == "release"
    # Its next check fails again: held again.
    enforce(config, cast(Domain, dom), failed(dom), resume_on_pass=False)
    assert dom.run_state == PAUSED and sticky.held(config.state_dir, dom.uuid) is not None


def test_release_refuses_a_domain_not_held_and_a_missing_or_multi_line_reason(config: Config) -> None:
    dom = FakeDomain()
    with pytest.raises(ConfigError, match="not held by hostguard"):
        sticky.release(config, cast(Domain, dom), "why", "root")
    for bad in ("", "   ", "a\x1b[2Jb", "x" * 501):
        with pytest.raises(ConfigError):
            sticky.check_reason(bad)
    assert sticky.check_reason("  two\nlines ") == "two lines"


def test_release_is_for_root_only(config: Config, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from hostguard.cli import main

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["release", "dom", "--reason", "x", "--config", str(config.source)]) == 2
    assert "must be run as root" in capsys.readouterr().err


def test_a_release_that_cannot_be_audited_does_not_happen(config: Config) -> None:
    dom = FakeDomain()
    enforce(config, cast(Domain, dom), failed(dom), resume_on_pass=False)
    config.audit_log.unlink()
    config.audit_log.mkdir()  # not writable as a file
    with pytest.raises(ConfigError, match="stays held"):
        sticky.release(config, cast(Domain, dom), "why", "root")
    assert dom.run_state == PAUSED and sticky.held(config.state_dir, dom.uuid) is not None


def test_under_the_destroy_policy_a_resumed_hold_is_destroyed(config: Config) -> None:
    dom = FakeDomain(run_state=PAUSED)
    sticky.hold(config.state_dir, dom.name(), dom.uuid, action="destroy", reason="r")
    dom.resume()
    event(Daemon(config), dom, RESUMED, UNPAUSED)
    assert dom.calls[-1] == "destroy" and audit(config)[-1]["operation"] == "held-domain-destroyed"


def test_quarantine_is_a_hold_and_its_pass_ends_it_before_our_own_resume(config: Config) -> None:
    """The pass's resume sends RESUMED too: by then no hold may be left, or we would pause our own resume."""
    holds: list[object] = []

    class Watched(FakeDomain, frozen=False):
        def resume(self) -> int:
            holds.append(sticky.held(config.state_dir, self.uuid))
            return super().resume()

    dom = Watched(run_state=PAUSED)
    sticky.quarantine(config.state_dir, dom.uuid)
    daemon = Daemon(config)
    dom.run_state = RUNNING  # resumed by someone while its check runs
    event(daemon, dom, RESUMED, UNPAUSED)
    assert dom.calls == ["suspend"]
    passed = Verdict(domain="d", uuid=dom.uuid, status="pass", action="none", reason="ok", trigger="t")
    enforce(config, cast(Domain, dom), passed, resume_on_pass=True)
    assert holds == [None] and dom.run_state == RUNNING
    event(daemon, dom, RESUMED, UNPAUSED)
    assert dom.calls == ["suspend", "resume"]


def test_a_held_domain_started_again_is_quarantined(config: Config) -> None:
    dom = FakeDomain()
    sticky.hold(config.state_dir, dom.name(), dom.uuid, action="pause", reason="r")
    daemon = Daemon(config)
    event(daemon, dom, STARTED)
    assert dom.calls == ["suspend"] and sticky.quarantine_path(config.state_dir, dom.uuid).exists()
    assert queued(daemon) == [(dom.uuid, "started")]


def test_a_stale_resumed_event_of_a_paused_domain_does_nothing(config: Config) -> None:
    dom = FakeDomain(run_state=PAUSED)
    sticky.hold(config.state_dir, dom.name(), dom.uuid, action="pause", reason="r")
    event(Daemon(config), dom, RESUMED, UNPAUSED)
    assert dom.calls == [] and audit(config) == []


def test_an_unreadable_hold_still_holds(config: Config) -> None:
    dom = FakeDomain()
    path = sticky.sticky_path(config.state_dir, dom.uuid)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff not json")
    event(Daemon(config), dom, RESUMED, UNPAUSED)
    assert dom.calls == ["suspend"]


def test_a_guest_started_paused_is_checked_at_its_first_resume_only(config: Config) -> None:
    """Nova: start paused, then resume. The check at STARTED saw no vCPU run; the first resume gets one more."""
    dom = FakeDomain(run_state=PAUSED)
    daemon = Daemon(config)
    event(daemon, dom, STARTED)
    assert queued(daemon) == [(dom.uuid, "started")]  # checked while paused: the disks, not yet the kernel
    dom.resume()
    event(daemon, dom, RESUMED, UNPAUSED)
    assert queued(daemon) == [(dom.uuid, "resumed")]
    dom.suspend()
    dom.resume()  # e.g. the disk stage's own suspend and resume
    event(daemon, dom, RESUMED, UNPAUSED)
    assert queued(daemon) == []


def test_at_daemon_start_a_held_domain_found_running_is_paused_and_holds_of_vanished_domains_go(
    config: Config,
) -> None:
    running, paused = FakeDomain(domain_name="running"), FakeDomain(domain_name="paused", run_state=PAUSED)
    for d in (running, paused):
        sticky.hold(config.state_dir, d.name(), d.uuid, action="pause", reason="r")
    sticky.quarantine(config.state_dir, "0000-gone")
    host = cast(Connection, FakeHost(running, paused))
    acted = sticky.reassert_all(config, host)
    assert acted == ["running"] and running.run_state == PAUSED and paused.calls == []
    assert audit(config)[0]["seen"] == "found-running"
    forget_gone_domains(config.state_dir, host, now=time.time() + GRACE_SECONDS + 1)  # the daemon's next step
    assert sticky.held_uuids(config.state_dir) == {running.uuid, paused.uuid}


def test_hostguard_start_holds_the_domain_from_before_its_start(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed by anyone while `hostguard start` checks it: paused again; a failed check leaves a hold."""
    import argparse

    from hostguard.commands import guard_cmd

    daemon = Daemon(config)
    seen: list[object] = []

    class Starting(FakeDomain, frozen=False):
        def createWithFlags(self, flags: int = 0) -> int:
            seen.append(sticky.held(config.state_dir, self.uuid))
            return super().createWithFlags(flags)

    dom = Starting(run_state=libvirt.VIR_DOMAIN_SHUTOFF)

    def check(config: Config, d: Domain, trigger: str, *, resume_on_pass: bool) -> Verdict:
        dom.resume()  # `virsh resume` while the check runs
        event(daemon, dom, RESUMED, UNPAUSED)
        assert dom.run_state == PAUSED
        verdict = failed(dom)
        enforce(config, d, verdict, resume_on_pass=resume_on_pass)
        return verdict

    monkeypatch.setattr(guard_cmd, "open_connection", lambda: None)
    monkeypatch.setattr(guard_cmd, "lookup", lambda _conn, _name: dom)
    monkeypatch.setattr(guard_cmd, "check_and_enforce", check)
    assert guard_cmd.start(argparse.Namespace(domain=dom.name(), config=str(config.source))) == 1
    assert seen and seen[0] is not None  # held before libvirt started it
    hold = sticky.held(config.state_dir, dom.uuid)
    assert hold is not None and hold["action"] == "pause"
    assert not sticky.quarantine_path(config.state_dir, dom.uuid).exists()
