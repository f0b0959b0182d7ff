"""The in-place memory check with and without ADR 0025's skip of the guest kernel's page array and bounce
buffer, interleaved on the same running guests (512 MiB and 8 GiB by default), in one warm process.

    .venv/bin/python bench/bench_memory_skip.py [--sizes 512,8192] [--runs 7]

Prints the median check and ELF-scan times per size and variant, and the ratio largest / smallest size per
variant (issue 21's goal: <= 1.5x). bench_memory.py measures the whole picture (dump path, held time, memory).
"""

from __future__ import annotations

import argparse
import collections
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

    from hostguard.memory import live
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

        for mib in sizes:  # first checks: VMCOREINFO scan, kernel facts
            check(mib)
        rows: dict[tuple[int, bool], list[dict[str, float]]] = collections.defaultdict(list)
        for _ in range(args.runs):
            for mib in sizes:
                for skip in (False, True):
                    for n in names:
                        setattr(live, n, real[n] if skip else nothing)
                    rows[(mib, skip)].append(check(mib))
        for n in names:
            setattr(live, n, real[n])

    def median(key: tuple[int, bool], what: str) -> float:
        return statistics.median(t.get(what, 0.0) for t in rows[key]) * 1000

    for mib, skip in sorted(rows):
        check_ms, scan_ms = median((mib, skip), "total"), median((mib, skip), "elf_scan")
        print(f"{mib} MiB {'skip' if skip else 'all':5} check {check_ms:6.1f} ms   ELF scan {scan_ms:6.1f} ms")
    for skip in (False, True):
        ratio = median((sizes[-1], skip), "total") / median((sizes[0], skip), "total")
        print(f"{sizes[-1]} / {sizes[0]} MiB, {'with' if skip else 'without'} the skip: {ratio:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
