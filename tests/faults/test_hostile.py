"""A hostile guest under checks (issue 20, item 8): its disk filled with a million directory entries. The check
must stay bounded in time and memory and end in a verdict. docs/reliability.md lists what was observed.

The guest's writes are made on the host, as the guest would leave them: the signed base's raw twin is
loop-mounted, filled, and turned into a qcow2 overlay on the signed base (`qemu-img convert -B`: only the
clusters that differ). The domain is started paused: the hook and the daemon see exactly the files QEMU holds,
and no TCG boot is spent."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.faults.test_faults import start_paused
from tests.integration.test_daemon import DaemonProcess, config_with, wait_verdict
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")
ENTRIES = 1_000_000  # directory entries: 400 directories of 2,500 hard links to 17 one-byte files
MEMORY_BOUND_KIB = 512 * 1024
LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one inode; the 64 MiB root has ~16k inodes free


@contextlib.contextmanager
def loop_mounted(raw: Path, where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(raw), str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)
        where.rmdir()


def fill_with_entries(root: Path, count: int) -> list[Path]:
    """`count` directory entries under root/junk; returns the few files they all link to."""
    seeds: list[Path] = []
    made = 0
    for d in range(count // 2500 + 1):
        directory = root / "junk" / f"d{d}"
        directory.mkdir(parents=True)
        for i in range(min(2500, count - made)):
            if made % LINKS_PER_FILE == 0:
                seeds.append(directory / f"s{i}")
                seeds[-1].write_bytes(b"x")
            else:
                os.link(seeds[-1], directory / f"f{i}")
            made += 1
    return seeds


def hostile_overlay(raw_twin: Path, base: Path, env: LibvirtEnv, name: str, *, executable: bool) -> Path:
    raw = env.path(f"{name}.raw")
    subprocess.run(["cp", "--sparse=always", str(raw_twin), str(raw)], check=True)
    with loop_mounted(raw, env.path(f"{name}-mnt")) as root:
        for seed in fill_with_entries(root, ENTRIES):
            seed.chmod(0o755 if executable else 0o644)
    overlay = env.path(f"{name}.qcow2")
    convert = ["qemu-img", "convert", "-q", "-O", "qcow2", "-B", str(base), "-F", "qcow2", str(raw), str(overlay)]
    subprocess.run(convert, check=True)
    raw.unlink()
    overlay.chmod(0o644)
    return overlay


def test_a_guest_that_fills_its_disk_with_a_million_entries_gets_a_bounded_check_and_a_verdict(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    config = config_with(host, "hostile", "memory_check = false\ncheck_interval_seconds = 3600")
    daemon = DaemonProcess(host, config)
    daemon.start()
    report = []
    try:
        for n, executable in enumerate((False, True)):
            t = time.monotonic()
            overlay = hostile_overlay(
                busybox_guest.root_raw, signed_base, libvirt_env, f"hostile-{n}", executable=executable
            )
            built = time.monotonic() - t
            dom = libvirt_env.define_guest(f"hostile-{n}", busybox_guest, disk_path=overlay)
            t = time.time()
            assert start_paused(dom) is None
            verdict = wait_verdict(host, dom, t, timeout=600)
            stage_ms = verdict["stages_ms"].get("disk-content", 0.0)
            report.append(
                f"{ENTRIES} entries ({'executable' if executable else 'plain'} files, overlay "
                f"{overlay.stat().st_size >> 20} MiB, built in {built:.0f} s): {verdict['status']} "
                f"({verdict['action']}) in {verdict['duration_ms'] / 1000:.1f} s (disk stage {stage_ms / 1000:.1f} s): "
                f"{verdict['reason'][:160]}; daemon peak RSS {daemon.peak_rss_kib() >> 10} MiB"
            )
            if executable:  # a million executables: over the inventory's bound, said, and acted on by policy
                assert verdict["status"] == "fail", verdict
                assert "more than 250000 executable components" in verdict["reason"], verdict["reason"]
            else:  # plain files are walked (bounded by max_nodes = 5,000,000), not listed
                assert verdict["status"] == "pass", verdict
            assert verdict["duration_ms"] < 300_000
            dom.destroy()
        peak = daemon.peak_rss_kib()
    finally:
        daemon.kill()
    for line in report:
        print(line)
    # Bounded in memory too: the incremental inventory checks its bound as entries are found and keeps a few values
    # per pending entry (it held every entry, 1.3 GiB, before; docs/reliability.md).
    assert peak <= MEMORY_BOUND_KIB, f"daemon peak RSS {peak >> 10} MiB > {MEMORY_BOUND_KIB >> 10} MiB"
