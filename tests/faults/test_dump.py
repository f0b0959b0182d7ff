"""The memory stage's dump fallback under a SIGKILL (the case docs/reliability.md listed as still to be written).

The memory stage reads guest RAM in place; it falls back to a whole-RAM dump where it cannot place RAM, as for
a guest with two NUMA cells of one size (two RAM blocks of that size in QEMU). That dump's pause is libvirt's
(a non-live dump): libvirtd finishes the dump and resumes the guest whatever became of the client that asked.
Then the restarted daemon re-checks the guest through the same fallback; a destroy during that dump leads to no
action."""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.test_faults import _kill_when
from tests.integration.test_daemon import DaemonProcess, config_with, wait_verdict
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")


def test_daemon_killed_during_a_fallback_memory_dump_leaves_the_guest_running_and_rechecks_it(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    config = config_with(host, "dump", "memory_check = true\ncheck_interval_seconds = 3600")
    disk = libvirt_env.overlay(signed_base, "dump.qcow2")
    dom = libvirt_env.define_numa_guest("dump", busybox_guest, disk_path=disk)
    dom.create()
    libvirt_env.wait_for_console(dom, busybox_guest.marker)
    dumping = [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_DUMP]
    dumps = host.state / "memory" / "dumps"
    daemon = DaemonProcess(host, config)
    daemon.start()
    try:
        _kill_when(daemon, lambda: dom.state() == dumping, timeout=300, settle=0.0)
        deadline = time.monotonic() + 120
        while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # resumed by libvirtd, no daemon running
        leftovers = sorted(p.name for p in dumps.glob("*.core"))

        t = time.time()
        daemon.start()
        verdict = wait_verdict(host, dom, t, trigger="daemon-start", timeout=300)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert verdict["status"] in ("pass", "fail"), verdict
        assert "read through a whole-RAM dump instead" in verdict["reason"] + str(verdict.get("notes")), verdict
        print(
            f"killed during the fallback dump: dump files left {leftovers}; re-check: {verdict['status']} "
            f"({verdict['action']}) {verdict['reason'][:200]}"
        )

        # A destroy during the next check's dump: nothing done, the daemon carries on. `gone` when the destroy
        # cut the dump short; `pass` when the dump was whole by then (the paused-for-dump state ends with the
        # dump, before its analysis): the check had everything it needed.
        daemon.kill()
        t = time.time()
        daemon.start()
        deadline = time.monotonic() + 300
        while dom.state() != dumping and time.monotonic() < deadline:
            time.sleep(0.002)
        dom.destroy()
        verdict = wait_verdict(host, dom, t, trigger="daemon-start", timeout=300)
        print(f"destroyed during the dump: {verdict['status']} ({verdict['action']}): {verdict['reason'][:200]}")
        assert verdict["action"] == "none" and verdict["status"] in ("gone", "pass"), verdict
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        daemon.kill()
