"""Nova's layout through the installed hook and a real TCG boot (issue 15): a raw `_base/<sha1>` converted from
the signed qcow2, no sidecar (its envelope found by digest), a qcow2 overlay with backing_fmt raw, and fresh
ephemeral and swap bases and a config drive under `[policy] profile = "nova"`; the daemon runs beside it, and the
domain started as the hook allowed it gets a passing post-start verdict (no false `unsigned-hotplug-disk`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_daemon import DaemonProcess, wait_verdict
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import Disk, LibvirtEnv
from tests.testbed.prereq import require_tool

pytestmark = pytest.mark.integration


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def test_a_nova_shaped_guest_boots_through_the_installed_hook(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    for tool in ("qemu-img", "mkfs.ext4", "mkswap", "genisoimage"):
        require_tool(tool)
    base_dir = libvirt_env.path("_base")
    base_dir.mkdir(mode=0o755)
    base = base_dir / hashlib.sha1(b"155d900f-4e14-4e4c-a73d-069cbf4541e6").hexdigest()
    run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(signed_base), str(base))
    base.chmod(0o644)
    index = libvirt_env.path("envelopes")
    index.mkdir(mode=0o755)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    shutil.copyfile(f"{signed_base}.hgsig", index / f"{digest}.hgsig")
    ephemeral, swap = base_dir / "ephemeral_1_0706d66", base_dir / "swap_256"
    run("truncate", "-s", "16M", str(ephemeral))
    run("mkfs.ext4", "-q", "-F", "-L", "ephemeral0", str(ephemeral))
    run("truncate", "-s", "8M", str(swap))
    run("mkswap", "-q", str(swap))
    content = libvirt_env.path("config-drive")
    (content / "openstack" / "latest").mkdir(parents=True)
    (content / "openstack" / "latest" / "meta_data.json").write_text('{"uuid": "nova"}')
    config_drive = libvirt_env.path("disk.config")
    run("genisoimage", "-quiet", "-o", str(config_drive), "-V", "config-2", "-r", "-J", str(content))
    for f in (ephemeral, swap, config_drive):
        f.chmod(0o644)
    host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')
    daemon = DaemonProcess(host, host.config)
    daemon.start()
    try:
        root = libvirt_env.overlay(base, "disk", backing_format="raw")
        extra = [
            Disk(libvirt_env.overlay(b, n, backing_format="raw"))
            for b, n in ((ephemeral, "disk.eph0"), (swap, "disk.swap"))
        ]
        dom = libvirt_env.define_guest("nova", busybox_guest, disk_path=root, extra_disks=extra)
        cdrom = (
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            f"<source file='{config_drive}'/><target dev='sda' bus='sata'/><readonly/></disk>"
        )
        dom = libvirt_env.connection().defineXML(dom.XMLDesc(0).replace("</devices>", cdrom + "</devices>"))
        time.sleep(1.5)  # the daemon connected and listening for events
        t = time.time()
        dom.create()
        libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
        record = [r for r in host.audit_records() if r.get("domain") == dom.name() and "verdict" in r][-1]
        assert record["verdict"] == "allow", record
        assert record["images"][0]["image"] == "busybox"  # type: ignore[index]
        notes = " ".join(record["notes"])  # type: ignore[arg-type]
        assert "Nova ephemeral base" in notes and "Nova swap base" in notes and "Nova config drive" in notes, notes
        # After start: the host-made disks are the hook's own admissions, not hot-plugs, nor unverified nodes.
        verdict = wait_verdict(host, dom, t)
        assert verdict["status"] == "pass", verdict
        assert {"hotplug", "block-graph"} <= set(verdict["stages_ms"]), verdict
        dom.destroy()
        # A flipped byte in the base: no envelope is found by its digest, the start is refused.
        with base.open("r+b") as fh:
            fh.seek(1 << 20)
            byte = fh.read(1)
            fh.seek(1 << 20)
            fh.write(bytes([byte[0] ^ 0xFF]))
        import libvirt

        with pytest.raises(libvirt.libvirtError, match=r"hostguard: denied .* is not signed"):
            dom.create()
    finally:
        daemon.kill()
        host.write_config()
