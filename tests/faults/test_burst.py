"""A burst of starts with the daemon running, and the trust store swapped in the middle of it (issue 20, items 3
and 4). docs/reliability.md lists what was observed.

The burst's domains are started paused: the hook decides each exactly as for any start, the daemon gets a
STARTED event for each, and 2 shared cores are not asked to boot 20 TCG guests at once."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from hostguard.host.trustdir import read_trust_dir
from tests.faults.test_faults import config_replaced, integrity, start_paused, state_dir_at
from tests.integration.test_daemon import DaemonProcess, config_with
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.pki import issue
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")
BURST = 20  # half signed, half tampered; all 20 at once through one barrier
SWAP_AFTER = 6  # decisions recorded before the trust store is swapped


def decided(host: GuardedHost, libvirt_env: LibvirtEnv) -> int:
    """Decisions of the burst in the audit log so far (raw lines: the last one may be half written now)."""
    burst = libvirt_env.domain_name("burst-")
    if not host.audit_log.exists():
        return 0
    return sum(burst in line for line in host.audit_log.read_text().splitlines())


def test_a_burst_of_twenty_starts_with_the_trust_store_swapped_midway_decides_each_under_one_version(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    pki = host.pki
    v1 = pki.write_trust_dir(host.dir / "trust-v1", crls=[pki.crl([host.revoked.cert])])
    v2 = pki.write_trust_dir(host.dir / "trust-v2", crls=[pki.crl([host.revoked.cert, pki.leaf.cert])])
    (v2 / "roots" / "root-2.pem").write_bytes(issue("hostguard test root 2", ca=True, path_length=1).pem)
    versions = {read_trust_dir(v1).fingerprint: "v1", read_trust_dir(v2).fingerprint: "v2"}
    live = host.dir / "trust-live"
    live.symlink_to(v1)
    state = host.dir / "state-burst"
    tampered = libvirt_env.tampered_copy(signed_base, "burst-tampered.qcow2")
    doms = [
        libvirt_env.define_guest(
            f"burst-{i}",
            busybox_guest,
            memory_mib=64,
            disk_path=libvirt_env.overlay(tampered if i % 2 else signed_base, f"burst-{i}.qcow2"),
        )
        for i in range(BURST)
    ]
    signed = {d.name() for i, d in enumerate(doms) if i % 2 == 0}
    with config_replaced(host, f'dir = "{host.trust}"', f'dir = "{live}"'), state_dir_at(host, state):
        daemon = DaemonProcess(host, config_with(host, "burst", "memory_check = false"))
        daemon.start()
        try:
            time.sleep(2)  # connected, listening
            results: dict[str, str | None] = {}
            barrier = threading.Barrier(BURST)

            def start(dom: Any) -> None:
                barrier.wait()
                results[dom.name()] = start_paused(dom)

            threads = [threading.Thread(target=start, args=(d,)) for d in doms]
            t0 = time.monotonic()
            for th in threads:
                th.start()
            names = {d.name() for d in doms}
            while decided(host, libvirt_env) < SWAP_AFTER:
                time.sleep(0.01)
            new = host.dir / "trust-live.new"
            new.symlink_to(v2)
            os.replace(new, live)  # the admin's atomic swap: new root, the signer revoked
            swapped_after = decided(host, libvirt_env)
            for th in threads:
                th.join(timeout=600)
            wall = time.monotonic() - t0
            assert len(results) == BURST

            # After the swap: the revoked signer is denied.
            late = libvirt_env.define_guest(
                "burst-late", busybox_guest, memory_mib=64, disk_path=libvirt_env.overlay(signed_base, "late.qcow2")
            )
            late_line = start_paused(late) or ""
            assert "hostguard: denied" in late_line and "is revoked by" in late_line, late_line
            assert daemon.proc is not None and daemon.proc.poll() is None  # the daemon took the burst
        finally:
            daemon.kill()

    lines = host.audit_log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: no torn or interleaved line
    burst = [r for r in records if r.get("domain") in names and r.get("operation") == "prepare"]
    assert sorted(str(r["domain"]) for r in burst) == sorted(names)  # one line per decision
    by_version: dict[str, int] = {}
    for r in burst:
        name, active = str(r["domain"]), libvirt_env.connection().lookupByName(str(r["domain"])).isActive()
        if name not in signed:
            assert r["verdict"] == "deny" and not active, r
            continue
        if r["verdict"] == "allow":
            assert versions.get(str(r.get("trust_store"))) == "v1", r  # the revoked signer never allowed under v2
            assert active
            by_version["allow under v1"] = by_version.get("allow under v1", 0) + 1
        else:
            assert r["verdict"] == "deny" and "is revoked by" in str(r["reason"]) and not active, r
            by_version["deny under v2"] = by_version.get("deny under v2", 0) + 1
    assert all("hostguard: denied" in (results[n] or "") for n in names - signed)
    ok, marks = integrity(state / "state.db", immutable=False)
    assert ok == "ok" and marks == [("busybox", 1)]
    slowest = max(burst, key=lambda r: float(r["duration_ms"]))
    print(
        f"burst of {BURST}: {wall:.1f} s wall; signed: {by_version}; swapped after {swapped_after} decisions; "
        f"slowest decision {slowest['duration_ms']} ms ({slowest['verdict']}); audit lines {len(lines)}, all whole"
    )
