"""What the in-place memory check costs per guest size, three ways interleaved on the same running guests (512 MiB
and 8 GiB by default), in one warm process:

    all         every used page scanned, pagemap read 8 bytes per page (before ADR 0025)
    skip        without the guest kernel's page array and bounce buffer (ADR 0025), pagemap read
    skip+scan   the same, the used pages found by the kernel's PAGEMAP_SCAN (Linux 6.7+; the daemon's default
                where the host kernel has it)

    .venv/bin/python bench/bench_memory_skip.py [--sizes 512,8192] [--runs 7]

Prints the median check and ELF-scan times per size and variant, and the ratio largest / smallest size per
variant (issue 21's goal: <= 1.5x). bench_memory.py measures the whole picture (dump path, held time, memory).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # hostguard and tests as packages; bench/ is on sys.path already


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512,8192")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    import libvirt
    from bench_memory import HOLDS, inputs_for

    from hostguard.memory import guestram, live
    from hostguard.memory.inspect import inspect_domain_memory
    from tests.integration.test_memory import start
    from tests.testbed import guests
    from tests.testbed.libvirt_env import LibvirtEnv

    sizes = [int(x) for x in args.sizes.split(",")]
    guest = guests.busybox_guest()
    inputs = inputs_for(guest)
    work = Path("/var/tmp/hostguard-bench-memory")
    work.mkdir(mode=0o700, exist_ok=True)
    names = ("page_array_ranges", "bounce_buffer_range")  # as live.py imported them
    real = {n: getattr(live, n) for n in names}

    def nothing(*_: object) -> list[tuple[int, int]]:
        return []

    with LibvirtEnv() as env:
        doms = {m: start(env, env.define_guest(f"skip{m}", guest, memory_mib=m), guest) for m in sizes}
        conn = libvirt.open("qemu:///system")

        def check(mib: int) -> dict[str, float]:
            report = inspect_domain_memory(
                doms[mib].name(),
                inputs.manifest,
                inputs.kernel_path,
                work,
                conn=conn,
                initrd_path=inputs.initrd_path,
                disk=inputs.disk,
                method="in-place",
                marker_dir=HOLDS,
            )
            assert report.findings == [], [f.describe() for f in report.findings]
            return report.timings

        for mib in sizes:  # first checks: VMCOREINFO scan, kernel facts; and whether the kernel has PAGEMAP_SCAN
            check(mib)
        variants = ["all", "skip", "skip+scan"] if guestram._scan_works == [True] else ["all", "skip"]
        if len(variants) == 2:
            print(f"this host kernel ({os.uname().release}) has no PAGEMAP_SCAN: skip+scan not measured")
        rows: dict[tuple[int, str], list[dict[str, float]]] = collections.defaultdict(list)
        for _ in range(args.runs):
            for mib in sizes:
                for variant in variants:
                    for n in names:
                        setattr(live, n, real[n] if variant != "all" else nothing)
                    guestram._scan_works[:] = [variant == "skip+scan"]
                    rows[(mib, variant)].append(check(mib))
        for n in names:
            setattr(live, n, real[n])

    def median(key: tuple[int, str], what: str) -> float:
        return statistics.median(t.get(what, 0.0) for t in rows[key]) * 1000

    for mib in sizes:
        for variant in variants:
            check_ms, scan_ms = median((mib, variant), "total"), median((mib, variant), "elf_scan")
            print(f"{mib} MiB {variant:9} check {check_ms:6.1f} ms   ELF scan {scan_ms:6.1f} ms")
    for variant in variants:
        ratio = median((sizes[-1], variant), "total") / median((sizes[0], variant), "total")
        print(f"{sizes[-1]} / {sizes[0]} MiB, {variant}: {ratio:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
