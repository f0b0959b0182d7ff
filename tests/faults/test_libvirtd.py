"""libvirtd restarted, SIGKILLed and stopped (SIGSTOP) under running guarded guests and starts in flight
(issue 20, items 1 and 7). docs/reliability.md lists what was observed.

Five busybox guests boot once and serve every fault of the test (TCG boots are the expensive part). The daemon
checks back to back (`check_interval_seconds = 1`, no memory stage), so a fault often lands while a disk stage
holds a guest suspended: that guest must come back running whatever libvirtd did meanwhile."""

from __future__ import annotations

import calendar
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.faults.test_faults import denial, run_cli, start_paused
from tests.integration.test_daemon import DaemonProcess, config_with
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")
REPO = Path(__file__).resolve().parents[2]
GUESTS = 5
PIDFILE = Path("/run/libvirtd.pid")
SETTLE = 6  # seconds: verdicts of checks that began before a file changed are not looked at


def libvirtd_pid() -> int:
    return int(PIDFILE.read_text().split()[0])


def hooks_running(names: list[str]) -> set[str]:
    """Which of these domains have their `prepare` hook running right now."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(a.endswith("50-hostguard") for a in text) and "prepare" in text:
            found.update(n for n in names if n in text)
    return found


def restart() -> None:
    subprocess.run(["bash", "scripts/libvirtd.sh", "restart"], check=True, cwd=REPO, capture_output=True)


def kill_and_start() -> None:
    pid = libvirtd_pid()
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.01)
    subprocess.run(["bash", "scripts/libvirtd.sh", "start"], check=True, cwd=REPO, capture_output=True)


def verdict_since(host: GuardedHost, dom: Any, after: float, trigger: str) -> dict[str, Any] | None:
    path = host.state / "verdicts" / f"{dom.UUIDString()}.json"
    try:
        v: dict[str, Any] = json.loads(path.read_text())  # written atomically (rename): whole or absent
    except FileNotFoundError:
        return None
    stamp = calendar.timegm(time.strptime(v["checked_at"], "%Y-%m-%dT%H:%M:%SZ"))
    return v if stamp >= int(after) - 1 and v["trigger"].startswith(trigger) else None


def wait_all(
    host: GuardedHost, doms: list[Any], after: float, trigger: str, timeout: float = 300
) -> list[dict[str, Any]]:
    """The first verdict of each domain with `trigger` since `after`. All verdict files are polled together:
    with checks back to back, a domain's next check soon overwrites the one looked for."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(doms) and time.monotonic() < deadline:
        for dom in doms:
            verdict = verdict_since(host, dom, after, trigger)
            if verdict is not None and dom.UUIDString() not in found:
                found[dom.UUIDString()] = verdict
        time.sleep(0.05)
    missing = [d.name() for d in doms if d.UUIDString() not in found]
    assert not missing, f"no {trigger!r} verdict since the fault for {missing}"
    return [found[d.UUIDString()] for d in doms]


def reconnected(env: LibvirtEnv) -> Any:
    """A new connection for the test (the old one may still look alive to libvirt after libvirtd went away)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            env.conn = libvirt.open("qemu:///system")
            env.conn.getLibVersion()
            return env.conn
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def paused(doms: list[Any]) -> list[str]:
    return [d.name() for d in doms if d.state()[0] != libvirt.VIR_DOMAIN_RUNNING]


def stay_paused(doms: list[Any], within: float = 15) -> list[str]:
    """Guests not once seen running within `within` s: with checks every second, a guest is often held
    suspended for a moment by a disk stage; one that stays paused is stranded."""
    left = set(paused(doms))
    deadline = time.monotonic() + within
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left &= set(paused(doms))
    return sorted(left)


def test_libvirtd_restarted_killed_and_stopped_strands_no_guest_and_loses_no_decision(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    config = config_with(host, "libvirtd", "memory_check = false\ncheck_interval_seconds = 1")
    guests = [
        libvirt_env.define_guest(
            f"lv-{i}", busybox_guest, memory_mib=128, disk_path=libvirt_env.overlay(signed_base, f"lv-{i}.qcow2")
        )
        for i in range(GUESTS)
    ]
    for dom in guests:
        dom.create()
    for dom in guests:
        libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=300)
    tampered = libvirt_env.tampered_copy(signed_base, "lv-tampered.qcow2")
    daemon = DaemonProcess(host, config)
    daemon.start()
    try:
        t = time.time()
        for verdict in wait_all(host, guests, t, "daemon-start"):
            assert verdict["status"] == "pass", verdict
        report: list[str] = []
        for n, (fault, inject) in enumerate((("restart", restart), ("SIGKILL", kill_and_start))):
            good = libvirt_env.define_guest(
                f"lv-good-{n}",
                busybox_guest,
                memory_mib=64,
                disk_path=libvirt_env.overlay(signed_base, f"lv-good-{n}.qcow2"),
            )
            bad = libvirt_env.define_guest(
                f"lv-bad-{n}",
                busybox_guest,
                memory_mib=64,
                disk_path=libvirt_env.overlay(tampered, f"lv-bad-{n}.qcow2"),
            )
            names = [good.name(), bad.name()]
            results: dict[str, str | None] = {}
            starts = [
                threading.Thread(target=lambda d=d, r=results: r.__setitem__(d.name(), start_paused(d)))
                for d in (good, bad)
            ]
            for th in starts:
                th.start()
            deadline = time.monotonic() + 30
            caught: set[str] = set()
            while time.monotonic() < deadline and len(results) < 2 and not caught:
                caught = hooks_running(names)
                time.sleep(0.002)
            held = paused(guests)  # guests a disk stage held suspended at the fault
            t = time.time()
            inject()
            for th in starts:
                th.join(timeout=120)
            conn = reconnected(libvirt_env)
            good, bad = conn.lookupByName(good.name()), conn.lookupByName(bad.name())
            guests = [conn.lookupByName(d.name()) for d in guests]
            # Every running guest re-checked after the reconnect, none left paused.
            # Re-checked after the reconnect (by its "reconnect" check, or by an "interval" one queued before it:
            # one queue entry per domain); a check on the dead connection cannot pass.
            for verdict in wait_all(host, guests, t + SETTLE, ""):
                assert verdict["status"] == "pass", verdict
            assert stay_paused(guests) == [], (
                f"after libvirtd {fault}: paused {paused(guests)} (held at the fault: {held})"
            )
            assert daemon.proc is not None and daemon.proc.poll() is None
            # Both in-flight starts: decided, audited, and the outcome agrees with the decision.
            audit = {
                name: [
                    r["verdict"]
                    for r in host.audit_records()
                    if r.get("domain") == name and r.get("operation") == "prepare"
                ]
                for name in names
            }
            assert audit[bad.name()] in (["deny"], []), audit
            assert not bad.isActive()
            if audit[bad.name()] == []:  # the fault came before libvirtd ran its hook: start it again
                assert "hostguard: denied" in (start_paused(bad) or "")
            assert [r["verdict"] for r in host.audit_records() if r.get("domain") == bad.name()] == ["deny"]
            assert audit[good.name()] in (["allow"], []), audit
            if not good.isActive():  # the start itself died with libvirtd: a new start is decided again
                assert start_paused(good) is None
            assert good.isActive()
            allowed = [
                r["verdict"]
                for r in host.audit_records()
                if r.get("domain") == good.name() and r.get("operation") == "prepare"
            ]
            assert set(allowed) == {"allow"}
            report.append(
                f"{fault}: hooks in flight at the fault {sorted(caught)}, guests held {held}, "
                f"start results {results}, audit {audit}"
            )
            print(report[-1])
            good.destroy()
        # A libvirtd that answers nothing for 30 s: whatever the daemon's calls did meanwhile (keepalive closes the
        # connection after ~20 s; a call in flight waits), it checks every guest again once libvirtd answers.
        pid = libvirtd_pid()
        held = paused(guests)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(30)
        finally:
            os.kill(pid, signal.SIGCONT)
        t = time.time()
        conn = reconnected(libvirt_env)
        guests = [conn.lookupByName(d.name()) for d in guests]
        verdicts = wait_all(host, guests, t + SETTLE, "")
        assert {v["status"] for v in verdicts} == {"pass"}, verdicts
        assert stay_paused(guests) == []
        log = daemon.log.read_text()
        triggers = sorted({v["trigger"] for v in verdicts})
        report.append(
            f"SIGSTOP 30 s: guests held at the stop {held}; re-checked after SIGCONT by {triggers}; daemon log: "
            f"{log.count('connection closed')} connection(s) closed, {log.count('connected to')} connect(s)"
        )
        print(report[-1])
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert list((host.state / "held").glob("*")) == []
        report.extend(host_set_up_broken(host, config, daemon, libvirt_env, guests, signed_base, busybox_guest))
    except AssertionError:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGUSR1)  # every thread's stack into the log
            time.sleep(2)
        print(daemon.log.read_text()[-12000:])  # what the daemon did instead
        raise
    finally:
        daemon.kill()


def host_set_up_broken(
    host: GuardedHost,
    config: Path,
    daemon: DaemonProcess,
    libvirt_env: LibvirtEnv,
    guests: list[Any],
    signed_base: Path,
    busybox_guest: Guest,
) -> list[str]:
    """Item 4 with the same running guests and daemon: the trust store corrupt, its CRL stale, the configuration
    missing or broken. New starts are denied in one line, running guests untouched, the daemon keeps running and
    `hostguard status` says why; everything recovers once the file is back."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.testbed.pki import DAY, NOW

    stale = host.pki.crl([host.revoked.cert], last_update=NOW - 10 * DAY, next_update=NOW - DAY)
    faults = {
        "trust store corrupt": (host.trust / "roots" / "root.pem", b"\x00not a certificate\xff" * 64),
        "CRL stale": (host.trust / "crls" / "crl0.pem", stale.public_bytes(Encoding.PEM)),
        "configuration broken": (host.config, b"[policy\nmode = enforce\n"),
        "configuration missing": (host.config, None),
    }
    report = []
    for n, (fault, (path, content)) in enumerate(faults.items()):
        good = path.read_bytes()
        dom = libvirt_env.define_guest(
            f"cfg-{n}", busybox_guest, memory_mib=64, disk_path=libvirt_env.overlay(signed_base, f"cfg-{n}.qcow2")
        )
        try:
            if content is None:
                path.unlink()
            else:
                path.write_bytes(content)
            line = denial(start_paused(dom))
            verdicts = wait_all(host, guests, time.time() + SETTLE, "interval")
            # `hostguard status` with the configuration that broke (the hook's) or the daemon's own
            status = run_cli("status", "--config", str(host.config if path == host.config else config))
            first = (status.stdout or status.stderr).splitlines()[0]
            assert stay_paused(guests) == [], f"{fault}: paused {paused(guests)}"
            assert daemon.proc is not None and daemon.proc.poll() is None
            if path == host.config:  # the daemon runs on the configuration it loaded; the hook reads it at each start
                assert {v["status"] for v in verdicts} == {"pass"}, verdicts
                assert status.returncode == 2 and status.stderr.count("\n") == 1, status.stderr
                assert first.startswith(("error: cannot read configuration", f"error: {host.config} is not valid"))
            else:
                assert {(v["status"], v["action"]) for v in verdicts} == {("error", "log")}, verdicts
                assert first.startswith("daemon: host error, the guest was not judged: "), first
                assert "new starts are denied" in first
            report.append(f"{fault}: start {line!r}; guests {[v['status'] for v in verdicts]}; status {first!r}")
            print(report[-1])
        finally:
            path.write_bytes(good)
        assert start_paused(dom) is None  # recovered
        dom.destroy()
    assert {v["status"] for v in wait_all(host, guests, time.time() + SETTLE, "interval")} == {"pass"}
    assert not run_cli("status", "--config", str(config)).stdout.startswith("daemon:")  # the host error cleared
    return report
