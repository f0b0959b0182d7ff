"""`make demo`: hostguard's main job end to end on a built-in demo, as far as the code exists today.

It builds the test-bed busybox guest, makes a demo CA and signs the guest's image, installs the hook into the
running libvirtd, starts a signed VM, shows a tampered VM being refused with its reason, and cleans up after
itself. Each step says plainly what it did; steps that are not built yet say so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.testbed import content, guests
from tests.testbed.guarded import GuardedHost
from tests.testbed.libvirt_env import LibvirtEnv

STEP = 0


def step(text: str) -> None:
    global STEP
    STEP += 1
    print(f"\n[{STEP}] {text}", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    say("$ virsh " + " ".join(args))
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=check)


def wait_verdict(state: Path, uuid: str, after: float, timeout: float = 180) -> dict[str, Any]:
    path = state / "verdicts" / f"{uuid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime >= after:
            doc: dict[str, Any] = json.loads(path.read_text())
            return doc
        time.sleep(0.2)
    raise TimeoutError(f"no post-start verdict for {uuid} within {timeout:.0f} s")


def main() -> int:
    step("Build the demo guest from host packages (Debian kernel, busybox initramfs, ext4 root; cached)")
    t = time.monotonic()
    guest = guests.busybox_guest(content.kernel_version())
    say(f"kernel {guest.kernel_version}, root disk {guest.root_qcow2} ({time.monotonic() - t:.1f} s)")

    step("Make a demo CA (root -> intermediate -> code-signing leaf), a trust store, and install the hook")
    with GuardedHost() as host, LibvirtEnv() as env:
        say(f"trust store {host.trust}; signer {host.pki.leaf.subject}")
        say(f"hook installed at {host.installed_hook()} and libvirtd restarted to load it")

        step("Producer: inventory and sign the demo image (hostguard manifest create + hostguard sign)")
        base = host.publish(guest, "demo-busybox", 1)
        say(f"signed image {base}")
        say(f"envelope     {base}.hgsig")

        step("Admin: start a VM on a qcow2 overlay of the signed image (virsh start)")
        overlay = env.overlay(base, "demo-signed.qcow2")
        dom = env.define_guest("demo-signed", guest, disk_path=overlay)
        t = time.monotonic()
        virsh("start", dom.name())
        log = env.wait_for_console(dom, guest.marker, timeout=180)
        line = next(x for x in log.splitlines() if guest.marker in x)
        say(f"{dom.name()} started; its console says: {line.strip()} ({time.monotonic() - t:.1f} s)")
        record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
        say(f"audit: verdict={record['verdict']} image={record.get('images')} in {record['duration_ms']} ms")
        dom.destroy()

        step("Attacker: flip one byte of a copy of the signed image, keep the signature, try to boot it")
        tampered = env.tampered_copy(base, "demo-tampered.qcow2")
        bad = env.define_guest("demo-tampered", guest, disk_path=tampered)
        result = virsh("start", bad.name(), check=False)
        if result.returncode == 0:
            say("UNEXPECTED: the tampered VM started")
            return 1
        text = result.stderr.strip()
        say(f"refused (virsh exit {result.returncode}); the admin reads: " + text[text.find("hostguard:") :])

        step("Post-start guard: hostguardd checks a running VM, then catches tampering after its pre-boot check")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "hostguard.cli", "daemon", "--config", str(host.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            guarded = env.define_guest("demo-guarded", guest, disk_path=env.overlay(base, "demo-guarded.qcow2"))
            t = time.time()
            virsh("start", guarded.name())
            env.wait_for_console(guarded, guest.marker, timeout=180)
            verdict = wait_verdict(host.state, guarded.UUIDString(), t)
            say(f"post-start verdict: {verdict['status']} - {verdict['reason']} ({verdict['duration_ms']} ms)")
            extra = env.path("demo-unsigned-data.raw")
            extra.write_bytes(b"\0" * (1 << 20))
            t = time.time()
            say("attacker with host access hot-plugs an unsigned disk into the running VM:")
            virsh("attach-disk", guarded.name(), str(extra), "vdb", "--driver", "qemu", "--subdriver", "raw", "--live")
            verdict = wait_verdict(host.state, guarded.UUIDString(), t)
            say(f"post-start verdict: {verdict['status']}, action {verdict['action']} - {verdict['reason']}")
            state = virsh("domstate", guarded.name(), "--reason").stdout.strip()
            say(f"virsh domstate --reason: {state}")
            meta = virsh("metadata", guarded.name(), "--uri", "https://hostguard.dev/xmlns/verdict/1").stdout.strip()
            say(f"virsh metadata: {meta}")
            status = subprocess.run(
                [sys.executable, "-m", "hostguard.cli", "status", guarded.name(), "--config", str(host.config)],
                capture_output=True,
                text=True,
                check=False,
            )
            for line in status.stdout.splitlines():
                say(line)
            say("(a changed or new executable inside the overlay is caught the same way by the disk-content stage:")
            say(" tests/integration/test_daemon_disk.py writes one through QEMU's monitor and sees the guest paused)")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)

        step("Clean up: destroy and undefine the demo VMs, uninstall the hook, restart libvirtd")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
