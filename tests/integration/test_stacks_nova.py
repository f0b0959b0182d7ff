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


def test_a_touched_nova_base_starts_from_the_daemons_kept_digest_and_a_written_one_is_hashed(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    """Issue 15 item 3 through the installed hook and a real hostguardd: Nova `utime()`s its base at every spawn;
    the hook takes the digest the daemon keeps under its read lease ("kept" in the audit record) instead of
    hashing again. A store through a shared writable mapping, which leaves mtime and ctime alone, is never served
    from it: the base is hashed and the start refused."""
    import mmap
    import os
    import time

    import libvirt

    from hostguard.host.digest import FileIdentity, kept_digest, open_image
    from tests.integration.test_daemon import DaemonProcess, config_with

    require_tool("qemu-img")
    base_dir = libvirt_env.path("_base_kept")
    base_dir.mkdir(mode=0o755)
    base = base_dir / hashlib.sha1(b"0b6a3a5e-4d84-4f55-9d8b-2f0a5d4b6c11").hexdigest()
    run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(signed_base), str(base))
    base.chmod(0o644)
    index = libvirt_env.path("kept-envelopes")
    index.mkdir(mode=0o755)
    shutil.copyfile(f"{signed_base}.hgsig", index / f"{hashlib.sha256(base.read_bytes()).hexdigest()}.hgsig")
    host.write_config(envelope_index_dirs=json.dumps([str(index)]), profile='"nova"')
    config = config_with(host, "kept", "")
    config.write_text(
        config.read_text().replace("[daemon]\n", f"[daemon]\nimage_dirs = {json.dumps([str(base_dir)])}\n")
    )
    os.replace(config, host.config)  # the hook reads the same file
    daemon = DaemonProcess(host, host.config)
    daemon.start()
    try:
        row = host.state / "kept"
        deadline = time.monotonic() + 120
        while not (row.is_dir() and any(row.iterdir())):
            assert time.monotonic() < deadline, f"the daemon kept nothing: {daemon.log.read_text()[-2000:]}"
            time.sleep(0.2)
        dom = libvirt_env.define_guest("nova-kept", busybox_guest, disk_path=libvirt_env.overlay(base, "disk", "raw"))

        def start_from() -> str:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)  # Nova's start path: paused, then resumed
            dom.resume()
            record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
            assert record["verdict"] == "allow", record
            digests = record["digests"]
            assert isinstance(digests, list)
            return str(next(d["from"] for d in digests if d["path"] == str(base)))

        def wait_kept() -> None:
            # libvirt (remember_owner = 1, the default) opens every image it labels O_RDWR for its metadata lock,
            # at start and at stop: an open for writing, so the daemon drops the digest and hashes the base again
            # once libvirt closed it (ADR 0021). The hook itself never hashes for a touch.
            deadline = time.monotonic() + 120
            while True:
                fd = open_image(base)
                try:
                    if kept_digest(host.state, fd, FileIdentity.from_stat(os.fstat(fd))) is not None:
                        return
                finally:
                    os.close(fd)
                assert time.monotonic() < deadline, f"not kept again: {daemon.log.read_text()[-2000:]}"
                time.sleep(0.1)

        assert start_from() == "kept"
        libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
        dom.destroy()
        for _ in range(2):
            wait_kept()
            os.utime(base)  # what Nova does at every spawn
            assert start_from() == "kept"  # no re-hash while libvirt waits on the hook
            dom.destroy()

        fd = os.open(base, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            offset = 1 << 20
            mapping[offset : offset + 1] = mapping[offset : offset + 1]  # dirty the page: still the signed bytes
            times = (base.stat().st_mtime_ns, base.stat().st_ctime_ns)
            mapping[offset : offset + 4] = b"evil"  # the same page: mtime and ctime stay
            assert (base.stat().st_mtime_ns, base.stat().st_ctime_ns) == times
            with pytest.raises(libvirt.libvirtError, match=r"hostguard: denied .* is not signed"):
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            record = [r for r in host.audit_records() if r.get("domain") == dom.name()][-1]
            assert record["verdict"] == "deny", record
        finally:
            mapping.close()
    finally:
        daemon.kill()
        host.write_config()
