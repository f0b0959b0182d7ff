"""A hostile guest under checks (issue 20, item 8): a guest that keeps its task list changing. Processes are
forked and exit in loops as fast as one TCG vCPU allows (four `while :; do busybox true; done` loops, two loops of
short-lived process trees that also leave orphans to init, four pools of ~12 processes ending at random moments)
while `hostguard daemon` checks it back to back with its memory stage on (guest RAM read in place, the guest paused
for the kernel-list walk only). Every check must end in a verdict, bounded in time, and be right: the guest runs
only signed executables, so `pass` with no finding and no note, and the guest is never left paused.
docs/reliability.md lists what was observed.

The guest's program is on its signed image: the test bed's busybox root plus /usr/local/bin/churn (an executable
script, so a manifest entry), published and signed like any image; the guest runs it through `hostguard.run=`."""

from __future__ import annotations

import dataclasses
import itertools
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.integration.test_daemon import DaemonProcess, config_with
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require_module, require_tool
from tests.unit.diskcheck_images import debugfs

libvirt = require_module("libvirt")

CHURN_PATH = "/usr/local/bin/churn"
# Runs in the guest (hostguard.run=): changes the task list as fast as it can until the host destroys the guest.
# Every process is /bin/busybox, a signed file: `/bin/busybox true` with a path is a fork and an exec (a bare
# `true` would be run inside the shell). The pools keep ~50 processes alive that end at random moments, so tasks
# leave the middle of the list too, not only its tail. CHURN-PID lines give a new process's pid every 2 s.
CHURN = """#!/bin/sh
bb=/bin/busybox
spin() { while :; do $bb true; done; }
trees() {
  while :; do
    ( $bb true & $bb true & ( $bb true & $bb true & wait ) & wait )
    ( $bb true & )
  done
}
pool() {
  while :; do
    for i in 1 2 3 4 5 6 7 8 9 10 11 12; do $bb usleep $((RANDOM % 700000)) & done
    wait
  done
}
for i in 1 2 3 4; do spin & done
for i in 1 2; do trees & done
for i in 1 2 3 4; do pool & done
echo "CHURN-STARTED pid_max=$($bb cat /proc/sys/kernel/pid_max)"
while :; do
  echo "CHURN-PID $($bb sh -c 'echo $$') $($bb cut -d' ' -f1 /proc/uptime)"
  $bb sleep 2
done
"""
VERDICTS = 30  # checks collected once the churn runs (back to back: about two a second)
COLLECT_SECONDS = 420.0  # for all of them (a check here takes a few seconds; the host is shared)
HANG_GUARD_MS = 120_000  # per check: a hang guard, not a performance bound
PAUSE_GUARD_SECONDS = 10.0  # a pause seen longer than this is a guest left paused (the walk's hold limit is 2 s)


def churn_guest(busybox_guest: Guest, env: LibvirtEnv) -> Guest:
    """The busybox guest with CHURN at CHURN_PATH (mode 0755) on its root disk."""
    raw = env.path("churn-root.raw")
    subprocess.run(["cp", "--sparse=always", str(busybox_guest.root_raw), str(raw)], check=True)
    script = env.path("churn.sh")
    script.write_text(CHURN)
    debugfs(raw, [f"write {script} {CHURN_PATH}", f"sif {CHURN_PATH} mode 0100755"])
    qcow2 = env.path("churn-root.qcow2")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.chmod(0o644)
    qcow2.chmod(0o644)
    return dataclasses.replace(busybox_guest, name="busybox-churn", root_qcow2=qcow2, root_raw=raw)


class PauseWatch(threading.Thread):
    """Polls the domain's state every 10 ms on a connection of its own: every stretch it was seen paused."""

    def __init__(self, uuid: str) -> None:
        super().__init__(daemon=True)
        self.conn = libvirt.open("qemu:///system")
        self.dom = self.conn.lookupByUUIDString(uuid)
        self.stop = threading.Event()
        self.stretches: list[float] = []  # seconds seen paused, one per stretch
        self.polls = 0
        self.errors: list[str] = []
        self._since: float | None = None

    def paused_now_for(self) -> float:
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                state = self.dom.state()[0]
            except libvirt.libvirtError as err:
                self.errors.append(str(err))
                return
            now = time.monotonic()
            self.polls += 1
            if state == libvirt.VIR_DOMAIN_PAUSED and self._since is None:
                self._since = now
            elif state != libvirt.VIR_DOMAIN_PAUSED and self._since is not None:
                self.stretches.append(now - self._since)
                self._since = None
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=10)
        self.conn.close()


def rss_kib(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def checks_of(host: GuardedHost, uuid: str) -> list[dict[str, Any]]:
    """The daemon's verdicts on `uuid`, in order: one audit line each."""
    return [r for r in host.audit_records() if r.get("operation") == "post-start-check" and r.get("uuid") == uuid]


def started_at(verdict: dict[str, Any]) -> float:
    end = time.mktime(time.strptime(verdict["checked_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    return float(end - verdict["duration_ms"] / 1000)


def churn_rate(console: str) -> tuple[int, float, int]:
    """(pids used, seconds, pid_max) from the guest's CHURN-PID lines (pids wrap at pid_max)."""
    pid_max = int(re.search(r"CHURN-STARTED pid_max=(\d+)", console).group(1))  # type: ignore[union-attr]
    samples = [(int(p), float(t)) for p, t in re.findall(r"CHURN-PID (\d+) ([\d.]+)", console)]
    used = sum((b[0] - a[0]) % pid_max for a, b in itertools.pairwise(samples))
    return used, samples[-1][1] - samples[0][1] if len(samples) > 1 else 0.0, pid_max


def test_a_guest_that_keeps_its_task_list_changing_gets_bounded_correct_memory_checks(
    host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    require_tool("debugfs")
    guest = churn_guest(busybox_guest, libvirt_env)
    signed = host.publish(guest, "busybox-churn", 1)
    config = config_with(host, "tasks", "memory_check = true\ncheck_interval_seconds = 0.5")
    disk = libvirt_env.overlay(signed, "tasks.qcow2")
    dom = libvirt_env.define_guest("tasks", guest, disk_path=disk, cmdline_extra=f"hostguard.run={CHURN_PATH}")
    uuid = dom.UUIDString()
    daemon = DaemonProcess(host, config)
    daemon.start()
    watch: PauseWatch | None = None
    report: list[str] = []
    try:
        dom.create()
        watch = PauseWatch(uuid)
        watch.start()
        boot_deadline = time.monotonic() + 300
        while "CHURN-STARTED" not in libvirt_env.console_text(dom):  # a check failing on the boot fails at once
            wrong = [v for v in checks_of(host, uuid) if v["status"] != "pass"]
            assert not wrong, f"during the boot: {wrong[0]['status']} ({wrong[0]['action']}) {wrong[0]['reason']}"
            assert time.monotonic() < boot_deadline, "no CHURN-STARTED within 300 s"
            time.sleep(0.2)
        churning = int(time.time())
        deadline = time.monotonic() + COLLECT_SECONDS
        seen = 0
        collected: list[dict[str, Any]] = []
        while len(collected) < VERDICTS:
            assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
            assert time.monotonic() < deadline, (
                f"{len(collected)} of {VERDICTS} verdicts in {COLLECT_SECONDS:.0f} s (a check hangs?); daemon log:\n"
                + daemon.log.read_text()[-3000:]
            )
            assert watch.paused_now_for() < PAUSE_GUARD_SECONDS, f"paused for {watch.paused_now_for():.1f} s"
            checks = checks_of(host, uuid)
            for verdict in checks[seen:]:
                if started_at(verdict) < churning:
                    continue  # it began before the churn did
                state = dom.state()
                stage_ms = verdict["stages_ms"].get("memory")
                report.append(
                    f"{verdict['status']} ({verdict['action']}, {verdict['trigger']}) in "
                    f"{verdict['duration_ms'] / 1000:.2f} s, memory stage "
                    f"{'-' if stage_ms is None else f'{stage_ms / 1000:.2f} s'}, disk stage "
                    f"{verdict['stages_ms'].get('disk-content', 0) / 1000:.2f} s; domain then {state}; "
                    f"daemon RSS {rss_kib(daemon) >> 10} MiB (peak {daemon.peak_rss_kib() >> 10} MiB)"
                )
                collected.append(verdict)
                assert verdict["status"] == "pass", verdict
                assert verdict["action"] == "none" and not verdict["findings"], verdict
                assert not verdict["notes"], verdict  # e.g. a task list walked torn would be a note: no check
                assert stage_ms is not None, verdict  # the memory stage ran
                assert verdict["duration_ms"] < HANG_GUARD_MS, verdict
                assert state[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED), state
            seen = len(checks)
            time.sleep(0.2)
        peak = daemon.peak_rss_kib()
        # The checks during the boot count too: a check that lands while the guest is still in its initramfs
        # (pid 1 and its insmods run the signed initrd's busybox from rootfs) found an unknown process, and the
        # guest stayed paused before its init ran (1 run in 5 shown by its verdicts, 1 more with that symptom before
        # the fix). Notes are fine there (no kernel yet).
        early = [v for v in checks_of(host, uuid) if started_at(v) < churning]
        assert all(v["status"] == "pass" for v in early), [(v["trigger"], v["status"], v["reason"]) for v in early]
        # Never left paused: running now and some time after the last check (a check may hold it right now).
        end = time.monotonic() + 30
        while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < end:
            time.sleep(0.05)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
        console = libvirt_env.console_text(dom)
    except BaseException:
        for v in checks_of(host, uuid):  # what the daemon said, for the failure's diagnosis
            print(f"verdict {v['checked_at']} {v['trigger']}: {v['status']} ({v['action']}) {v['reason'][:300]}")
        print(f"domain state {dom.state()}; daemon log:\n{daemon.log.read_text()[-4000:]}")
        raise
    finally:
        if watch is not None:
            watch.close()
        daemon.kill()
    log = daemon.log.read_text()
    used, seconds, pid_max = churn_rate(console)
    durations = [v["duration_ms"] / 1000 for v in collected]
    memory = [v["stages_ms"]["memory"] / 1000 for v in collected]
    pauses = watch.stretches
    report += [
        f"{len(early)} checks during the boot, all pass ({sum(bool(v['notes']) for v in early)} with a note: "
        "no kernel yet)",
        f"{len(collected)} checks: duration median {statistics.median(durations):.2f} s, slowest "
        f"{max(durations):.2f} s; memory stage median {statistics.median(memory):.2f} s, slowest {max(memory):.2f} s",
        f"guest: {used} new pids in {seconds:.0f} s ({used / max(seconds, 1):.0f} processes/s, pid_max {pid_max})",
        f"paused stretches seen (10 ms polls, disk stage and memory walk): {len(pauses)}, longest "
        f"{max(pauses, default=0) * 1000:.0f} ms, {watch.polls} polls; daemon peak RSS {peak >> 10} MiB",
    ]
    print("\n".join(report))
    assert not watch.errors, watch.errors
    assert "Traceback" not in log, log[-3000:]
    assert "outlasted the pause limit" not in log and "cannot resume" not in log, log[-3000:]
    assert max(pauses, default=0) < PAUSE_GUARD_SECONDS, pauses
    assert used >= 100, f"the guest's task list hardly changed: {used} pids in {seconds:.0f} s"
