"""The libvirt qemu hook: `/etc/libvirt/hooks/qemu.d/50-hostguard DOMAIN OP SUBOP EXTRA`, domain XML on stdin.

Rules from libvirt's hooks page that shape this file:
- `prepare begin` runs before QEMU starts; a non-zero exit aborts the start and libvirt shows our stderr to the
  `virsh` user: exactly one line.
- `migrate begin` / `restore begin` treat stdout as replacement XML: we print nothing, ever.
- a failing `reconnect` makes libvirt kill the running QEMU: it never fails for our own or infrastructure errors.
- hooks must never call the libvirt API (deadlock) and have no timeout: our own deadline denies instead of hanging.
Any unexpected error at a verifying operation is a deny; its traceback goes to the log file only.

Start-up cost matters (every VM start waits for this process): nothing heavy is imported here, typing and
datetime included; see bench/bench_hook.py for the measured wall time.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # `signal` is this module wrapped in enums: ~2.5 ms of imports
import _thread
import os
import sys
import time

from hostguard.errors import EXIT_ALLOW, EXIT_DENY, DeadlineError, HostguardError

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType
    from typing import Any, NoReturn

VERIFYING = {("prepare", "begin"), ("migrate", "begin"), ("restore", "begin")}
PINNED = {("start", "begin"), ("started", "begin")}  # the files QEMU gets are the verified ones (ADR 0018)
NOTIFY = {("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "end"), ("reconnect", "begin")}
MAX_XML_BYTES = 1024 * 1024
HOOK_LOG = "/var/log/hostguard/hook.log"
WATCHDOG_GRACE = 2.0  # seconds past the deadline before the watchdog thread ends a hook whose SIGALRM did not
AUDIT_GRACE = 2.0  # seconds the watchdog gives its own audit line (the log may sit on the hung file system too)


def _read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_XML_BYTES + 1)
    while len(data) > MAX_XML_BYTES and sys.stdin.buffer.read(65536):
        pass  # drain the rest; the parser refuses the oversized document in one line
    return data


def _log_traceback(context: str) -> None:
    import traceback

    try:
        path = os.environ.get("HOSTGUARD_HOOK_LOG", HOOK_LOG)
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {context}\n")
            traceback.print_exc(file=fh)
    except OSError:
        traceback.print_exc(file=sys.stderr)  # last resort: still fail closed below


def _on_deadline(_signum: int, _frame: FrameType | None) -> None:
    raise DeadlineError("verification did not finish within the deadline")


class _Watchdog:
    """The deadline's backstop. SIGALRM's handler runs only when the main thread is back in Python; a read that
    blocks in the kernel (a disk image on a hung FUSE or NFS file system) never comes back, not even for a
    signal, and libvirt waits for its hook without a timeout: the start would hang forever. This thread ends
    the process with a deny instead (os._exit kills the stuck thread: its wait is killable)."""

    def __init__(self, domain: str, op: str, started: float) -> None:
        self.domain, self.op, self.started = domain, op, started
        self.finishing = _thread.allocate_lock()  # whoever holds it records the decision: main thread or watchdog
        self.done = False

    def start(self, config: Any) -> None:
        _thread.start_new_thread(self._run, (config,))

    def finish(self) -> None:
        """The main thread is about to record its decision (blocks forever if the watchdog already does)."""
        self.finishing.acquire()

    def _run(self, config: Any) -> None:
        time.sleep(config.deadline_seconds + WATCHDOG_GRACE)
        if self.finishing.acquire(False):
            reason = (
                f"verification did not finish within the deadline ({config.deadline_seconds:g} s): it is blocked "
                "in the kernel (a hung file system or device holding one of the domain's files?)"
            )
        else:  # the main thread is recording its decision: stuck there (the audit log's file system?) or done
            time.sleep(AUDIT_GRACE)
            if self.done:
                return
            reason = "the decision cannot be recorded: writing the audit log did not finish"
        record = {
            "domain": self.domain,
            "operation": self.op,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        written = _thread.allocate_lock()
        written.acquire()

        def audit() -> None:
            try:
                _audit(config, record)
            except Exception:  # noqa: BLE001 - the deny is said and returned whatever happens to its record
                _log_traceback(f"{self.domain} {self.op} (watchdog's audit line)")
            finally:
                written.release()

        code = _deny(config, record, self.domain, reason, audit=lambda: _thread.start_new_thread(audit, ()))
        written.acquire(timeout=AUDIT_GRACE)
        sys.stderr.flush()
        os._exit(code)


def _audit(config: Any, record: dict[str, Any]) -> str | None:
    """Write the audit record; None, or why it could not be written."""
    from pathlib import Path

    # lazy: every VM start runs the hook; it loads only what this operation needs
    from hostguard.host.audit import write_audit
    from hostguard.host.config import DEFAULT_AUDIT_LOG

    if config is None:  # the configuration itself is broken: still leave a record
        return write_audit(Path(DEFAULT_AUDIT_LOG), record, to_syslog=True)
    return write_audit(config.audit_log, record, to_syslog=config.syslog)


def _notify(config: Any, event: dict[str, Any]) -> None:
    # lazy: every VM start runs the hook; it loads only what this operation needs
    from hostguard.host.notify import notify_daemon

    notify_daemon(config.daemon_socket, event)


def _decide(xml: bytes, config: Any, operation: str, watchdog: _Watchdog) -> Any:
    # lazy: every VM start runs the hook; it loads only what this operation needs
    from hostguard.host.statedir import save_domain_record
    from hostguard.preboot.decide import decide

    _signal.signal(_signal.SIGALRM, _on_deadline)
    _signal.setitimer(_signal.ITIMER_REAL, config.deadline_seconds)
    watchdog.start(config)
    try:
        decision = decide(xml, config, time.time(), operation)
        if decision.exempt_by is None:
            save_domain_record(config.state_dir, decision.domain_record())
        return decision
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)


def _verify(domain: str, op: str, xml: bytes) -> int:
    """Run the pre-boot decision under the configured deadline; audit it; print one line on deny."""
    # lazy: every VM start runs the hook; it loads only what this operation needs
    from hostguard.host.config import load_config

    started = time.monotonic()
    watchdog = _Watchdog(domain, op, started)
    config = None
    record: dict[str, Any] = {"domain": domain, "operation": op}
    reason: str | None = None
    try:
        config = load_config()
        decision = _decide(xml, config, op, watchdog)
        record.update(uuid=decision.domain.uuid, **decision.summary())
        if decision.exempt_by is not None:
            record.update(verdict="exempt", reason=f"domain matches exemption {decision.exempt_by!r}")
        else:
            record["verdict"] = "allow"
    except HostguardError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - fail closed on anything unexpected; traceback to the log
        _log_traceback(f"{domain} {op}")
        reason = f"internal error ({type(exc).__name__}), details in {HOOK_LOG}"
    watchdog.finish()
    try:
        record["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        if reason is None:
            unrecorded = _audit(config, record)
            if unrecorded is None or record.get("verdict") == "exempt":  # out of scope: never blocked by hostguard
                return EXIT_ALLOW
            reason = f"the decision cannot be recorded: {unrecorded}"  # an allow nobody can audit is no allow
        return _deny(config, record, domain, reason, audit=lambda: _audit(config, record))
    finally:
        watchdog.done = True


def _check_pinned(domain: str, op: str, xml: bytes) -> int:
    """`start begin` / `started begin`: the files QEMU gets must be the ones `prepare` verified (ADR 0018).
    Only a refusal is audited (a pass adds nothing to the `prepare` record)."""
    # lazy: every VM start runs the hook; it loads only what this operation needs
    from hostguard.host.config import load_config

    config = None
    record: dict[str, Any] = {"domain": domain, "operation": op}
    try:
        config = load_config()
        if config.exemption_for(domain) is not None:
            return EXIT_ALLOW
        # lazy: every VM start runs the hook; it loads only what this operation needs
        from hostguard.preboot.pinned import check_pinned

        reason = check_pinned(config, xml, domain, op)
    except HostguardError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - fail closed on anything unexpected; traceback to the log
        _log_traceback(f"{domain} {op}")
        reason = f"internal error ({type(exc).__name__}), details in {HOOK_LOG}"
    if reason is None:
        return EXIT_ALLOW
    return _deny(config, record, domain, reason, audit=lambda: _audit(config, record))


def _deny(config: Any, record: dict[str, Any], domain: str, reason: str, *, audit: Any) -> int:
    """Record and say a deny (in audit mode: a would-deny, and the start goes on); the exit code."""
    if config is not None and config.mode == "audit":
        record.update(verdict="would-deny", reason=reason)
        audit()
        print(f"hostguard: audit mode, would deny {domain}: {reason}", file=sys.stderr)
        return EXIT_ALLOW
    record.update(verdict="deny", reason=reason)
    audit()
    print(f"hostguard: denied {domain}: {reason}", file=sys.stderr)
    return EXIT_DENY


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3:
        print("hostguard hook: usage: DOMAIN OPERATION SUBOPERATION [EXTRA]", file=sys.stderr)
        return EXIT_ALLOW  # not called by libvirt; never block anything on a malformed call
    domain, op, subop = argv[0], argv[1], argv[2]
    xml = _read_stdin()  # always drained, so libvirt never writes into a closed pipe
    if (op, subop) in VERIFYING:
        # Nothing on stdout for migrate/restore: libvirt would take it as replacement XML.
        return _verify(domain, op, xml)
    if (op, subop) in PINNED and (code := _check_pinned(domain, op, xml)) != EXIT_ALLOW:
        return code
    if (op, subop) in NOTIFY:
        _notify_safely(domain, op, xml)
    return EXIT_ALLOW


def run(argv: Sequence[str]) -> NoReturn:
    """`main`, then exit without the interpreter's teardown, which costs ~3 ms of every VM start (measured in
    bench/bench_hook.py). Safe here: every file and database hostguard opened is closed by then, nothing is
    registered with atexit on this path, and the standard streams are flushed first."""
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _notify_safely(domain: str, op: str, xml: bytes) -> None:
    """Tell the daemon; never fail (a failing `reconnect` would kill a running guest).

    At `release end` libvirt has just given the domain's files back to their owner (a chown: a new ctime), so
    the digests cached at `prepare` no longer match them; hashing the small ones again now keeps the next
    start's digest cache warm (see hostguard.preboot.decide.rewarm_digests).
    """
    try:
        # lazy: every VM start runs the hook; it loads only what this operation needs
        from hostguard.host.config import load_config

        config = load_config()
        _notify(config, {"domain": domain, "event": op})
        if op == "reconnect":
            _audit(config, {"domain": domain, "operation": op, "verdict": "noted"})
        if op == "release" and config.exemption_for(domain) is None:
            # lazy: every VM start runs the hook; it loads only what this operation needs
            from hostguard.preboot.decide import rewarm_digests

            rewarm_digests(config, xml)
    except Exception:  # noqa: BLE001 - must not fail; logged for the admin
        _log_traceback(f"{domain} {op} (notification, ignored)")
