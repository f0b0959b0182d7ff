"""A long run of a guarded host (issue #20): start, check and stop busybox guests in a loop for an hour or more.

Real libvirtd, the hostguard hook installed into it, `hostguard daemon` running as its own process. Every cycle
starts three domains on the test bed's busybox guest, in turn:

    signed      an overlay on the signed image: the hook allows it, the guest boots, the daemon's verdict is pass
    tampered    a copy of the signed image with one byte flipped (its envelope beside it): denied "disk digest:"
    unsigned    a private copy of the guest's disk with no envelope: denied "is not signed"

and stops and removes them again. It reports cycles, decisions (every one checked against the expected one, in
libvirt's answer and in the audit log), the slowest hook decision and daemon verdict, the daemon's RSS and open
file descriptors after the warm-up cycles and at the end (flat: <= 10 % growth), and what was left behind
(domains, files of the run, QEMU processes, the daemon's child processes, the hook file).

Sharing the host with other test runs: the test bed's host lock (tests/testbed/libvirt_env.py) is held SHARED
and only for the length of one cycle (each cycle is one LibvirtEnv), never for the hour. The soak's hook is its
own file (`qemu.d/45-hostguard-soak`, not `50-hostguard`, which the integration tests install and remove) with
its own configuration, which exempts every domain whose name does not start with this run's prefix: other runs'
domains pass through it untouched, and a test that installs its own hook (holding the lock exclusively) runs
between two cycles, while the soak has no domain. libvirtd re-reads qemu.d/ at every call once it had any qemu
hook when it started; when it had none, the soak restarts it once, under the lock held exclusively.

    .venv/bin/python bench/soak.py [--minutes 60] [--period 15] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hostguard.commands.hook_cmd import render_shim  # noqa: E402
from hostguard.host.doctor import HostView  # noqa: E402
from hostguard.host.fsutil import atomic_write  # noqa: E402
from tests.testbed import guests  # noqa: E402
from tests.testbed.content import kernel_version  # noqa: E402
from tests.testbed.guarded import HOOKS_DIR, GuardedHost  # noqa: E402
from tests.testbed.libvirt_env import (  # noqa: E402
    RECONNECT_GRACE,
    ConsoleTimeout,
    LibvirtEnv,
    ensure_libvirtd,
    host_exclusive,
    open_connection,
)

SHIM = HOOKS_DIR / "qemu.d" / "45-hostguard-soak"
WARMUP_CYCLES = 3
VERDICT_TIMEOUT = 300.0


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def exempt_all_but(prefix: str) -> list[str]:
    """fnmatch globs matching every name that does not start with `prefix` (fnmatch has no negation of a whole
    pattern, only of a character): each proper prefix of it exactly, and each one followed by another character."""
    globs = []
    for i, ch in enumerate(prefix):
        globs.append(prefix[:i] if i else "")
        globs.append(f"{prefix[:i]}[!{ch}]*")
    return [g for g in globs if g]


def hooks_enabled_in_libvirtd() -> bool:
    """Whether the running libvirtd had a qemu hook when it started (then it rescans qemu.d/ at every call)."""
    pid = libvirtd_pid()
    started = HostView().start_time(pid) if pid is not None else None
    if started is None:
        return False
    hooks = [HOOKS_DIR / "qemu", *sorted((HOOKS_DIR / "qemu.d").glob("*"))]
    return any(p != SHIM and p.is_file() and os.access(p, os.X_OK) and p.stat().st_ctime < started for p in hooks)


class Daemon:
    """`hostguard daemon` as its own process, measured from /proc."""

    def __init__(self, config: Path, logfile: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostguard.cli", "daemon", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=logfile.open("ab"),
        )

    def wait_ready(self, socket: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not open {socket}")
            time.sleep(0.1)
        time.sleep(1.0)  # connected to libvirt and idle

    def sample(self) -> dict[str, int]:
        pid = self.proc.pid
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return {
            "rss_kib": int(status["VmRSS"].split()[0]),
            "hwm_kib": int(status["VmHWM"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"]),
            "children": len(children),
        }

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


class VerdictTimeout(AssertionError):
    pass


def libvirtd_pid() -> int | None:
    view = HostView()
    pids = [pid for pid in view.pids() if view.comm(pid) == "libvirtd"]
    return min(pids) if pids else None


def wait_verdict(host: GuardedHost, uuid: str, after: float) -> dict[str, Any]:
    path = host.state / "verdicts" / f"{uuid}.json"
    deadline = time.monotonic() + VERDICT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            v: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            v = {}
        if v:  # the first verdict after the start, from the STARTED event or the hook's notification
            stamp = time.mktime(time.strptime(v["checked_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
            if stamp >= int(after) - 1:
                return v
        time.sleep(0.2)
    raise VerdictTimeout(f"no verdict for {uuid} within {VERDICT_TIMEOUT:.0f} s")


class Soak:
    def __init__(self, host: GuardedHost, guest: guests.Guest, signed: Path) -> None:
        self.host = host
        self.guest = guest
        self.signed = signed
        self.cycles = 0
        self.decisions: dict[str, int] = {"allow": 0, "deny": 0}
        self.wrong: list[str] = []
        self.hook_ms: list[float] = []
        self.verdict_ms: list[float] = []  # the daemon's own check time
        self.started_to_verdict: list[float] = []  # from virDomainCreate returning to the verdict file
        self.lock_wait: list[float] = []
        self._audit_seen = 0
        self.interrupted: list[str] = []

    def _audit(self, name: str) -> dict[str, Any]:
        records = self.host.audit_records()
        self._audit_seen = len(records)
        mine = [r for r in records if r.get("domain") == name and r.get("operation") == "prepare"]
        if len(mine) != 1:
            raise AssertionError(f"{name}: {len(mine)} audit records of its start, expected 1")
        return mine[0]

    def _expect(self, what: str, ok: bool, detail: str) -> None:
        if not ok:
            self.wrong.append(f"cycle {self.cycles} {what}: {detail}")
            log(f"WRONG cycle {self.cycles} {what}: {detail}")

    def cycle(self) -> None:
        import libvirt

        t0 = time.monotonic()
        with LibvirtEnv() as env:  # holds the host lock shared for this cycle only
            self.lock_wait.append(time.monotonic() - t0)
            # signed: allowed, boots, the daemon passes it
            dom = env.define_guest("signed", self.guest, disk_path=env.overlay(self.signed, "signed.qcow2"))
            after = time.time()
            dom.create()
            created = time.monotonic()
            env.wait_for_console(dom, self.guest.marker, timeout=180)
            verdict = wait_verdict(self.host, dom.UUIDString(), after)
            self.started_to_verdict.append(time.monotonic() - created)
            self.verdict_ms.append(float(verdict.get("duration_ms", 0.0)))
            self._expect("signed verdict", verdict["status"] == "pass", json.dumps(verdict)[:400])
            self._expect("signed running", dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING, f"state {dom.info()[0]}")
            record = self._audit(dom.name())
            self._expect("signed audit", record["verdict"] == "allow", str(record)[:400])
            self.decisions["allow" if record["verdict"] == "allow" else "deny"] += 1
            self.hook_ms.append(float(record["duration_ms"]))
            dom.destroy()

            # tampered: one byte of the signed image flipped, its envelope beside it
            image = env.copy_disk(self.signed, "tampered.qcow2")
            shutil.copyfile(f"{self.signed}.hgsig", f"{image}.hgsig")
            with image.open("r+b") as fh:
                offset = 1024 * 1024 + 4096 * (self.cycles % 64)
                fh.seek(offset)
                byte = fh.read(1)
                fh.seek(offset)
                fh.write(bytes([byte[0] ^ 0xFF]))
            self._denied(env, "tampered", image, "disk digest:")

            # unsigned: a private copy of the guest's disk, no envelope
            self._denied(env, "unsigned", env.copy_disk(self.guest.root_qcow2, "unsigned.qcow2"), "is not signed")
        self.cycles += 1

    def _denied(self, env: LibvirtEnv, what: str, image: Path, reason: str) -> None:
        import libvirt

        dom = env.define_guest(what, self.guest, disk_path=image)
        try:
            dom.create()
            error = ""
        except libvirt.libvirtError as err:
            error = str(err)
        self._expect(f"{what} refused", reason in error and not dom.isActive(), error[:300] or "it started")
        record = self._audit(dom.name())
        self._expect(f"{what} audit", record["verdict"] == "deny" and reason in record["reason"], str(record)[:400])
        self.decisions["deny" if record["verdict"] == "deny" else "allow"] += 1
        self.hook_ms.append(float(record["duration_ms"]))


def leftovers(host: GuardedHost, prefix: str) -> dict[str, Any]:
    conn = open_connection(grace=RECONNECT_GRACE)  # another run may be restarting libvirtd
    try:
        domains = [d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)]
    finally:
        conn.close()
    qemu = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if prefix.encode() in cmdline:
                qemu.append(int(proc.name))
    workdirs = sorted(p.name for p in Path("/var/lib/libvirt/images/hostguard-test").glob(f"{prefix}*"))
    return {"domains": domains, "processes": qemu, "workdirs": workdirs, "hook_file": SHIM.exists()}


def state_files(host: GuardedHost) -> dict[str, int]:
    """Files in the state directory by subdirectory (per-domain files of removed domains would pile up here)."""
    counts: dict[str, int] = {}
    for p in host.state.rglob("*"):
        if p.is_file():
            key = str(p.parent.relative_to(host.state))
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def median_max(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "slowest": None}
    return {"median": round(statistics.median(values), 2), "slowest": round(max(values), 2)}


def growth(a: int, b: int) -> float:
    return round(100.0 * (b - a) / a, 1) if a else 0.0


class Stopped(Exception):
    """SIGTERM or SIGINT: stop after cleaning up."""


def _stop(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up, not a second signal in the middle of it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped(f"stopped by signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--period", type=float, default=15.0, help="seconds from one cycle's start to the next (at least)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import libvirt

    # SIGTERM/SIGINT end the run through the same clean-up as its end: the cycle's domains (LibvirtEnv), the
    # daemon, the hook file and the run's directory (the default SIGTERM action would leave all of them).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # the refusals are expected: no stderr lines
    guest = guests.busybox_guest(kernel_version())
    prefix = f"hgt-{os.getpid()}-"
    host = GuardedHost(install_hook=False)
    daemon: Daemon | None = None
    result: dict[str, Any] = {"minutes": args.minutes, "prefix": prefix}
    try:
        host.write_config(exempt=json.dumps(exempt_all_but(prefix)))
        signed = host.publish(guest, "busybox", 1)
        atomic_write(SHIM, render_shim(str(host.config)), mode=0o755)
        if not hooks_enabled_in_libvirtd():
            log("libvirtd had no qemu hook when it started: restarting it once (host lock held exclusively)")
            with host_exclusive():
                subprocess.run(["bash", str(ROOT / "scripts" / "libvirtd.sh"), "restart"], check=True)
        daemon = Daemon(host.config, host.dir / "daemon.log")
        daemon.wait_ready(host.dir / "hostguard.sock")
        soak = Soak(host, guest, signed)
        files_before = state_files(host)
        samples: list[dict[str, Any]] = [{"cycle": 0, "t": 0.0, **daemon.sample()}]
        start = time.monotonic()
        end = start + args.minutes * 60
        try:
            while time.monotonic() < end:
                began = time.monotonic()
                pid = libvirtd_pid()
                try:
                    soak.cycle()
                except (libvirt.libvirtError, ConsoleTimeout, VerdictTimeout, subprocess.CalledProcessError) as err:
                    # Other test runs restart libvirtd (hook installs): a cycle cut short by that is counted
                    # and reported apart, never as a decision; anything else ends the run.
                    restarted = libvirtd_pid() != pid
                    soak.interrupted.append(
                        f"cycle {soak.cycles}: {type(err).__name__}: {str(err)[:300]}"
                        f"{' (libvirtd restarted meanwhile)' if restarted else ''}"
                    )
                    log(f"interrupted: {soak.interrupted[-1]}")
                    if not restarted:
                        soak.wrong.append(soak.interrupted[-1])
                if daemon.proc.poll() is not None:
                    raise AssertionError(f"the daemon exited ({daemon.proc.returncode}): see {host.dir}/daemon.log")
                s = {"cycle": soak.cycles, "t": round(time.monotonic() - start, 1), **daemon.sample()}
                samples.append(s)
                if soak.cycles <= WARMUP_CYCLES or soak.cycles % 10 == 0:
                    log(f"cycle {soak.cycles}: {s} wrong={len(soak.wrong)} hook {median_max(soak.hook_ms)} ms")
                time.sleep(max(0.0, min(began + args.period, end) - time.monotonic()))  # a steady rate, not a burst
        except Stopped as err:
            log(f"{err}: cleaning up")
            result["stopped"] = str(err)
        warm = samples[min(WARMUP_CYCLES, len(samples) - 1)]
        last = samples[-1]
        files_after = state_files(host)
        result.update(
            period_s=args.period,
            cycles=soak.cycles,
            seconds=round(time.monotonic() - start, 1),
            decisions=soak.decisions,
            wrong=soak.wrong,
            interrupted=soak.interrupted,
            hook_ms=median_max(soak.hook_ms),
            verdict_ms=median_max(soak.verdict_ms),
            started_to_verdict_s=median_max(soak.started_to_verdict),
            lock_wait_s={"total": round(sum(soak.lock_wait), 1), "longest": median_max(soak.lock_wait)["slowest"]},
            daemon={
                "first": samples[0],
                "after_warmup": warm,
                "end": last,
                "rss_growth_pct": growth(warm["rss_kib"], last["rss_kib"]),
                "fd_growth_pct": growth(warm["fds"], last["fds"]),
            },
            state_files={"before": files_before, "after": files_after},
            samples=samples,
        )
    finally:
        code = daemon.stop() if daemon is not None else None
        result["daemon_exit"] = code
        SHIM.unlink(missing_ok=True)
        host.close()
        result["left_behind"] = leftovers(host, prefix)
        result["left_behind"]["run_dir"] = host.dir.exists()
        log(f"daemon exit {code}, left behind: {result['left_behind']}")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    left = result["left_behind"]
    clean = not (left["domains"] or left["processes"] or left["workdirs"] or left["hook_file"] or left["run_dir"])
    flat = result["daemon"]["rss_growth_pct"] <= 10 and result["daemon"]["fd_growth_pct"] <= 10
    complete = "stopped" not in result
    return 0 if complete and not result["wrong"] and clean and flat and code == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stopped as stopped:  # before the loop: cleaned up already, nothing measured
        log(f"{stopped}: nothing measured")
        sys.exit(143)
