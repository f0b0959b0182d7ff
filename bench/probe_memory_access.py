"""Measure the candidate ways to read a running guest's RAM (the figures in docs/adr/0012-memory-in-place.md).

    .venv/bin/python bench/probe_memory_access.py [--memory-mib 6144]

Boots the test bed's busybox guest (TCG) through the real libvirtd and times, medians: libvirt's
virDomainMemoryPeek(VIR_MEMORY_PHYSICAL) per call (4 KiB, 64 KiB), one QEMU monitor command through libvirt,
pread of /proc/<qemu pid>/mem at the RAM block QEMU's memory tree and /proc/<pid>/maps place (8 B .. 16 MiB),
a pagemap pass over all guest RAM, and a suspend/resume round trip. Needs root and libvirtd.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_seconds(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-mib", type=int, default=6144)
    args = ap.parse_args()
    import libvirt

    from hostguard.host.libvirt import qemu_monitor_hmp, qemu_pid
    from hostguard.memory.guestram import open_guest_ram
    from tests.integration.test_memory import start
    from tests.testbed import guests
    from tests.testbed.libvirt_env import LibvirtEnv

    guest = guests.busybox_guest()
    with LibvirtEnv() as env:
        dom = start(env, env.define_guest("probe", guest, memory_mib=args.memory_mib), guest)
        for size in (4096, 65536):
            t = median_seconds(partial(dom.memoryPeek, 0x1000000, size, libvirt.VIR_MEMORY_PHYSICAL), 30)
            print(f"virDomainMemoryPeek {size:>6} B: {t * 1e3:7.2f} ms/call  {size / t / 2**20:8.1f} MiB/s")
        t = median_seconds(lambda: qemu_monitor_hmp(dom, "info mtree -f"), 10)
        print(f"QEMU monitor 'info mtree -f' via libvirt: {t * 1e3:.2f} ms")
        pid = qemu_pid(dom.name())
        assert pid is not None
        ram = open_guest_ram(pid, dom.UUIDString(), lambda c: qemu_monitor_hmp(dom, c))
        print("RAM ranges:", ", ".join(f"{r.gpa:#x}+{r.size >> 20} MiB" for r in ram.ranges))
        big = max(ram.ranges, key=lambda r: r.size)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            for size in (8, 4096, 1 << 20, 16 << 20):
                t = median_seconds(partial(os.pread, fd, size, big.hva + 0x1000000), 30)
                print(f"/proc/<pid>/mem pread {size:>9} B: {t * 1e6:9.1f} us  {size / t / 2**20:8.0f} MiB/s")
        finally:
            os.close(fd)
        started = time.perf_counter()
        used = sum(length for r in ram.ranges for _, length in ram.present_runs(r))
        print(
            f"pagemap over {ram.size >> 20} MiB: {(time.perf_counter() - started) * 1e3:.1f} ms, {used >> 20} MiB used"
        )
        pairs = []
        for _ in range(10):
            t0 = time.perf_counter()
            dom.suspend()
            t1 = time.perf_counter()
            dom.resume()
            pairs.append((t1 - t0, time.perf_counter() - t1))
        s, r = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"virDomainSuspend {s * 1e3:.1f} ms, virDomainResume {r * 1e3:.1f} ms")
        ram.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
