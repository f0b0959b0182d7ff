"""Issue 14 after start: the daemon compares QEMU's actual block graph with what the hook verified, and reacts to
media, device and block-job events. Real libvirtd, real QEMU (TCG), the real hook and `hostguard daemon`.

One busybox guest with an empty CD-ROM drive is shared by the cases, in order (each leaves it running and clean):
an unchanged guest passes; `virsh change-media` to an unsigned ISO is found at the tray event and the domain is
paused; a node added behind libvirt's back (`blockdev-add` through qemu-monitor-command) is found by the periodic
check; `virsh blockcopy` to an unverified file is found at the block job's event. Latencies are printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon import DaemonProcess, config_with, wait_verdict
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration
INTERVAL = 8  # seconds: the periodic check, which is what sees a change no libvirt event reports
CDROM = (
    "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>"
)


class Shared:
    def __init__(self, env: LibvirtEnv, dom: Any, daemon: DaemonProcess) -> None:
        self.env, self.dom, self.daemon = env, dom, daemon


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", *args], capture_output=True, text=True, check=True)


def qmp(dom: Any, command: dict[str, Any]) -> Any:
    return json.loads(virsh("qemu-monitor-command", dom.name(), json.dumps(command)).stdout)["return"]


def wait_state(dom: Any, want: int, since: float, timeout: float = 120) -> float:
    """Seconds from `since` until the domain is in state `want` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dom.info()[0] == want:
            return time.monotonic() - since
        time.sleep(0.02)
    pytest.fail(f"{dom.name()} not in state {want} within {timeout} s")


def resume_clean(shared: Shared, timeout: float = 120, dom: Any = None) -> None:
    """After a case: the domain running again and judged clean by a later check (an event's or the interval's)."""
    dom = shared.dom if dom is None else dom
    if dom.info()[0] != 1:
        dom.resume()
    path = shared.daemon.host.state / "verdicts" / f"{dom.UUIDString()}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if json.loads(path.read_text())["status"] == "pass" and dom.info()[0] == 1:
            return
        if dom.info()[0] == 3:  # paused again by a check queued before the clean-up finished
            dom.resume()
        time.sleep(0.2)
    pytest.fail(f"no passing verdict after the clean-up: {path.read_text()}")


def failed_verdict(host: GuardedHost, dom: Any, after: float, timeout: float = 60) -> dict[str, Any]:
    """The first failing verdict since `after` (or the last verdict when none fails within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        verdict = wait_verdict(host, dom, after, timeout=timeout)
        if verdict["status"] == "fail" or time.monotonic() > deadline:
            return verdict
        time.sleep(0.2)


@pytest.fixture(scope="module")
def shared(host: GuardedHost, signed_base: Path, busybox_guest: Guest) -> Iterator[Shared]:
    with LibvirtEnv() as env:
        dom = env.define_guest("graph", busybox_guest, disk_path=env.overlay(signed_base, "graph.qcow2"))
        dom = env.connection().defineXML(dom.XMLDesc(0).replace("</devices>", CDROM + "</devices>"))
        daemon = DaemonProcess(host, config_with(host, "graph", f"check_interval_seconds = {INTERVAL}"))
        daemon.start()
        try:
            time.sleep(1.5)  # connected and listening for events
            dom.create()
            env.wait_for_console(dom, busybox_guest.marker, 180)
            yield Shared(env, dom, daemon)
        finally:
            daemon.kill()


def test_an_unchanged_guest_with_an_empty_cdrom_passes(host: GuardedHost, shared: Shared) -> None:
    verdict = wait_verdict(host, shared.dom, time.time() - 300)
    assert verdict["status"] == "pass", verdict
    assert "block-graph" in verdict["stages_ms"], verdict
    # ... and the periodic check, which asks QEMU again, stays clean (no false finding from the live graph)
    verdict = wait_verdict(host, shared.dom, time.time() + 1, trigger="interval", timeout=60)
    assert verdict["status"] == "pass", verdict
    assert shared.dom.info()[0] == 1


def test_change_media_to_an_unsigned_iso_is_found_and_pauses_the_domain(host: GuardedHost, shared: Shared) -> None:
    iso = shared.env.path("unsigned.iso")
    iso.write_bytes(b"\0" * (1 << 20))
    iso.chmod(0o644)
    t0, t = time.monotonic(), time.time()
    virsh("change-media", shared.dom.name(), "sda", str(iso), "--insert", "--live")
    paused_after = wait_state(shared.dom, 3, t0)  # VIR_DOMAIN_PAUSED
    verdict = wait_verdict(host, shared.dom, t, trigger="tray-change:")
    print(f"change-media -> paused in {paused_after:.2f} s (check took {verdict['duration_ms']:.0f} ms)")
    assert verdict["status"] == "fail" and verdict["action"] == "pause", verdict
    assert [(f["kind"], f["path"]) for f in verdict["findings"]] == [("unverified-media", str(iso))]
    virsh("change-media", shared.dom.name(), "sda", "--eject", "--live")
    resume_clean(shared)


def test_a_node_added_with_blockdev_add_is_found_by_the_periodic_check(host: GuardedHost, shared: Shared) -> None:
    extra = shared.env.path("sneaky.raw")
    extra.write_bytes(b"\0" * (1 << 20))
    extra.chmod(0o644)
    t0, t = time.monotonic(), time.time()
    qmp(
        shared.dom,
        {
            "execute": "blockdev-add",
            "arguments": {"driver": "file", "node-name": "sneaky", "filename": str(extra), "read-only": True},
        },
    )
    paused_after = wait_state(shared.dom, 3, t0, timeout=INTERVAL * 4)
    verdict = wait_verdict(host, shared.dom, t, trigger="interval")
    print(f"blockdev-add (no libvirt event) -> paused in {paused_after:.2f} s with a {INTERVAL} s interval")
    assert verdict["status"] == "fail", verdict
    assert ("unverified-block-node", str(extra)) in [(f["kind"], f["path"]) for f in verdict["findings"]]
    qmp(shared.dom, {"execute": "blockdev-del", "arguments": {"node-name": "sneaky"}})
    resume_clean(shared)


def test_blockcopy_to_an_unverified_file_is_found_at_the_block_job_event(host: GuardedHost, shared: Shared) -> None:
    copy = shared.env.path("copy.qcow2")
    t0, t = time.monotonic(), time.time()
    virsh("blockcopy", shared.dom.name(), "vda", str(copy), "--format", "qcow2", "--transient-job")
    paused_after = wait_state(shared.dom, 3, t0)
    verdict = wait_verdict(host, shared.dom, t, trigger="block-job:")
    print(f"blockcopy -> paused in {paused_after:.2f} s")
    assert verdict["status"] == "fail", verdict
    assert ("unverified-block-node", str(copy)) in [(f["kind"], f["path"]) for f in verdict["findings"]]
    virsh("blockjob", shared.dom.name(), "vda", "--abort")
    resume_clean(shared)


def test_an_external_snapshot_adds_an_unsigned_top_layer_that_is_found(host: GuardedHost, shared: Shared) -> None:
    """`virsh snapshot-create-as --disk-only` puts a new, unverified top layer over the verified chain (with
    --reuse-external a file with content of its own). libvirt sends no event for it: the periodic check finds it."""
    snap = shared.env.path("graph-snap.qcow2")
    t0, t = time.monotonic(), time.time()
    virsh(
        "snapshot-create-as", shared.dom.name(), "--disk-only", "--no-metadata", "--atomic",
        "--diskspec", f"vda,snapshot=external,file={snap}", "--diskspec", "sda,snapshot=no",
    )  # fmt: skip
    paused_after = wait_state(shared.dom, 3, t0, timeout=INTERVAL * 4)
    verdict = failed_verdict(host, shared.dom, t)  # an interval check may have passed before the snapshot
    print(f"snapshot-create-as --disk-only -> paused in {paused_after:.2f} s with a {INTERVAL} s interval")
    assert verdict["status"] == "fail", verdict
    # the hot-plug stage sees vda's top change; the block-graph stage's node on the same file is not repeated
    assert [(f["kind"], f["path"], f["found"]) for f in verdict["findings"]] == [
        ("unsigned-hotplug-disk", "vda", str(snap))
    ], verdict
    # an admin's shallow active commit folds the snapshot back into the verified overlay: the graph is as recorded
    virsh("blockcommit", shared.dom.name(), "vda", "--active", "--shallow", "--pivot", "--wait")
    resume_clean(shared)


def test_a_block_commit_into_the_signed_base_is_found(
    host: GuardedHost, shared: Shared, signed_base: Path, busybox_guest: Guest
) -> None:
    """A scratch chain base <- mid <- top (base: a signed copy). An active commit (no --pivot) reopens the signed
    base for writing and stays in its READY state, every file still the verified one: found at READY. A commit of
    the middle layer into the base drops it from the graph: found at COMPLETED."""
    base = shared.env.path("chain-base.qcow2")
    shutil.copyfile(signed_base, base)
    shutil.copyfile(f"{signed_base}.hgsig", f"{base}.hgsig")
    base.chmod(0o644)
    mid = shared.env.overlay(base, "chain-mid.qcow2")
    top = shared.env.overlay(mid, "chain-top.qcow2")
    t = time.time()
    dom = shared.env.define_guest("chain", busybox_guest, disk_path=top)
    dom.create()
    try:
        assert wait_verdict(host, dom, t)["status"] == "pass"
        t0, t = time.monotonic(), time.time()
        virsh("blockcommit", dom.name(), "vda", "--active")  # returns at once; READY once the copy is in sync
        paused_after = wait_state(dom, 3, t0)
        verdict = wait_verdict(host, dom, t, trigger="block-job:")
        print(f"blockcommit --active (READY) -> paused in {paused_after:.2f} s")
        assert verdict["status"] == "fail", verdict
        assert ("unverified-block-node", str(base)) in [(f["kind"], f["path"]) for f in verdict["findings"]]
        virsh("blockjob", dom.name(), "vda", "--abort")
        # QEMU decides whether an aborted active commit reopens its base read-only: hostguard follows QEMU's own
        # graph, so the finding stays for as long as the format node is writable (QEMU 7.2 here keeps it so).
        nodes = qmp(dom, {"execute": "query-named-block-nodes", "arguments": {"flat": True}})
        writable = [n for n in nodes if n.get("file") == str(base) and n.get("drv") == "qcow2" and not n.get("ro")]
        print(f"after the abort QEMU holds the base {'read-write' if writable else 'read-only'}")
        if writable:
            assert wait_verdict(host, dom, time.time())["status"] == "fail"
            dom.destroy()  # a fresh start for the second case: the chain as verified, read-only below the top
            dom.create()
            resume_clean(shared, dom=dom)  # the verdict of the destroyed run ("gone") may come first
        else:
            resume_clean(shared, dom=dom)
        t0, t = time.monotonic(), time.time()
        virsh("blockcommit", dom.name(), "vda", "--top", str(mid), "--base", str(base), "--wait")
        paused_after = wait_state(dom, 3, t0)
        verdict = wait_verdict(host, dom, t, trigger="block-job:")
        print(f"blockcommit --top mid -> paused in {paused_after:.2f} s")
        assert verdict["status"] == "fail", verdict
        assert str(mid) in [f["path"] for f in verdict["findings"]], verdict
    finally:
        dom.destroy()
