"""Nova's layout through the installed hook and a real TCG boot (issue 15): a raw `_base/<sha1>` converted from
the signed qcow2, no sidecar (its envelope found by digest), a qcow2 overlay with backing_fmt raw, and fresh
ephemeral and swap bases under `[policy] profile = "nova"`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

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
    for tool in ("qemu-img", "mkfs.ext4", "mkswap"):
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
    for f in (ephemeral, swap):
        f.chmod(0o644)
    host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')
    try:
        root = libvirt_env.overlay(base, "disk", backing_format="raw")
        extra = [
            Disk(libvirt_env.overlay(b, n, backing_format="raw"))
            for b, n in ((ephemeral, "disk.eph0"), (swap, "disk.swap"))
        ]
        dom = libvirt_env.define_guest("nova", busybox_guest, disk_path=root, extra_disks=extra)
        dom.create()
        libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
        record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
        assert record["verdict"] == "allow", record
        assert record["images"][0]["image"] == "busybox"  # type: ignore[index]
        notes = " ".join(record["notes"])  # type: ignore[arg-type]
        assert "Nova ephemeral base" in notes and "Nova swap base" in notes, notes
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
        host.write_config()
