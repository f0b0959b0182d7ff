"""Check a domain, act on the verdict and record it: the one sequence the daemon and `hostguard start` share."""

from __future__ import annotations

import logging
from collections.abc import Callable

from hostguard.errors import HostguardError
from hostguard.host import libvirt
from hostguard.host.audit import write_audit
from hostguard.host.config import Config
from hostguard.host.libvirt import set_verdict_metadata
from hostguard.host.locks import domain_lock
from hostguard.poststart import sticky
from hostguard.poststart.check import check_domain
from hostguard.poststart.disk_stage import clear_held
from hostguard.poststart.verdicts import VERDICT_NS, VERDICT_PREFIX, Verdict, save_verdict

log = logging.getLogger("hostguard.poststart.enforce")


def apply_verdict(dom: libvirt.Domain, verdict: Verdict, *, resume_on_pass: bool) -> None:
    """pass: resume if we hold the domain paused; fail/error: pause, destroy or only log, per policy."""
    try:
        paused = dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED
        if verdict.status == "pass":
            if resume_on_pass and paused:
                dom.resume()
        elif verdict.action == "pause" and not paused:
            dom.suspend()
        elif verdict.action == "destroy":
            dom.destroy()
    except libvirt.libvirtError as exc:
        log.error("cannot %s %s: %s", verdict.action, verdict.domain, exc.get_error_message())


def record_verdict(
    config: Config, dom: libvirt.Domain, verdict: Verdict, observe: Callable[[Verdict], None] | None = None
) -> None:
    """State file, domain metadata (live and persistent), audit log, metrics."""
    save_verdict(config.state_dir, verdict)
    try:
        set_verdict_metadata(dom, verdict.metadata_xml(), VERDICT_NS, VERDICT_PREFIX)
    except libvirt.libvirtError as exc:
        log.info("verdict metadata not set on %s: %s", verdict.domain, exc.get_error_message())
    write_audit(config.audit_log, {"operation": "post-start-check", **verdict.to_json()}, to_syslog=config.syslog)
    if observe is not None:
        observe(verdict)
    log.info("%s: %s (%s) %s", verdict.domain, verdict.status, verdict.action, verdict.reason)


def enforce(
    config: Config,
    dom: libvirt.Domain,
    verdict: Verdict,
    *,
    resume_on_pass: bool,
    observe: Callable[[Verdict], None] | None = None,
) -> None:
    """Act on the verdict (nothing to act on for a domain that is gone) and record it. A verdict that pauses or
    destroys clears the held-for-inspection marker: a restarted daemon must not resume what policy paused.

    Sticky holds (ADR 0020): a pause or destroy is recorded as a hold before it is done, so that a resume by
    anyone is undone; a pass ends the hold before our own resume, whose RESUMED event must not look like one."""
    if verdict.status == "pass":
        sticky.clear(config.state_dir, verdict.uuid)
    elif verdict.status != "gone" and verdict.action in ("pause", "destroy"):
        try:
            sticky.hold(config.state_dir, verdict.domain, verdict.uuid, action=verdict.action, reason=verdict.reason)
        except HostguardError as exc:  # the pause itself still happens: it is the safe side
            log.error("%s: hold not recorded, a resume will not be undone: %s", verdict.domain, exc)
    if verdict.status != "gone":
        apply_verdict(dom, verdict, resume_on_pass=resume_on_pass)
    if verdict.status != "pass" and verdict.action in ("pause", "destroy"):
        clear_held(config.state_dir, verdict.uuid)
    record_verdict(config, dom, verdict, observe)


def check_and_enforce(
    config: Config,
    dom: libvirt.Domain,
    trigger: str,
    *,
    resume_on_pass: bool,
    observe: Callable[[Verdict], None] | None = None,
    given_up: Callable[[], bool] | None = None,
) -> Verdict:
    """Lock, check, act, record. One check and its enforcement per domain at a time: another check's
    suspend/resume must never release a domain that this one is about to pause. A check the daemon gave up
    (`given_up()`: blocked past its deadline, its error verdict recorded) that returns after all is not acted
    on: it read a guest that was resumed meanwhile, and its outcome is often the hung storage's own error."""
    with domain_lock(config.state_dir, dom.UUIDString()):
        verdict = check_domain(config, dom, trigger)
        if given_up is not None and given_up():
            log.warning(
                "%s: a check given up at its deadline ended after all (%s: %s): not acted on; checked again",
                verdict.domain, verdict.status, verdict.reason[:200],
            )  # fmt: skip
            return verdict
        enforce(config, dom, verdict, resume_on_pass=resume_on_pass, observe=observe)
    return verdict
