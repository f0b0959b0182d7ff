"""Benchmark: memory introspection of a running 256 MiB guest. Dump time (the floor), analysis time (processes,
modules, ELF page scan, comparison), total, peak host memory; and, on the same dump, volatility3's `banners`
plugin (the best-known memory-forensics tool; its `linux.pslist` would need debug symbols hostguard does without).

    .venv/bin/python bench/bench_memory.py [--runs 5] [--memory-mib 256] [--workdir /var/tmp/hostguard-bench-memory]

Boots the test bed's busybox guest through the real libvirtd (TCG), records the kernel's vDSO baseline once,
then per run: dump (`hostguard.memory.acquire.memory_dump`, libvirt memory-only ELF dump), analysis in a fresh
process (`inspect_dump`, as the CLI runs it: imports and kernel-facts cache read included; peak RSS from GNU
time), analysis again in this process (warm, as the daemon runs it), and `vol -f DUMP banners.Banners`.
Medians are reported, then the ratios. Needs root, libvirtd, the test bed, and volatility3 in the venv
(`pip install volatility3`: the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB, GNU time) and stdout of one run of `argv`."""
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "HGMAXRSS=%M", *argv], capture_output=True, check=False)
    wall = time.monotonic() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {err[-2000:]}")
    peak = int(err.rsplit("HGMAXRSS=", 1)[1].split()[0])
    return wall, peak, proc.stdout.decode()


def inputs_for(guest: Any) -> Any:
    from hostguard.imagefs import open_reader
    from hostguard.memory.diskref import disk_facts
    from hostguard.memory.inspect import Inputs
    from tests.integration.test_memory import manifest_for

    manifest = manifest_for(guest)
    with open_reader([(guest.root_qcow2, "qcow2")]) as reader:
        disk = disk_facts(reader, manifest)
    return Inputs(manifest, guest.kernel, guest.initrd, disk)


def analyze_once(dump: Path, workdir: Path) -> None:
    """Child process: one `inspect_dump`, timings as JSON on stdout (disk reference excluded: the daemon has
    it from the disk check)."""
    from tests.testbed import guests

    inputs = inputs_for(guests.busybox_guest())
    started = time.monotonic()
    from hostguard.memory.inspect import inspect_dump

    report = inspect_dump(dump, inputs, workdir)
    wall = time.monotonic() - started
    print(
        json.dumps(
            {
                "wall": wall,
                "timings": report.timings,
                "findings": [f.describe() for f in report.findings],
                "processes": len(report.snapshot.processes) if report.snapshot else None,
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/hostguard-bench-memory"))
    ap.add_argument("--analyze-dump", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.analyze_dump:
        analyze_once(args.analyze_dump, args.workdir)
        return 0

    import libvirt

    from hostguard.memory.acquire import memory_dump
    from hostguard.memory.inspect import inspect_dump, record_vdso_baseline
    from tests.integration.test_memory import retrying, start
    from tests.testbed import guests
    from tests.testbed.libvirt_env import LibvirtEnv

    vol = shutil.which("vol", path=str(Path(PY).parent))
    if vol is None:
        log("volatility3 is not installed in this venv: pip install volatility3 (the bench extra)")
        return 2
    args.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    guest = guests.busybox_guest()
    inputs = inputs_for(guest)
    rows: list[dict[str, float]] = []
    with LibvirtEnv() as env:
        log(f"booting the busybox guest with {args.memory_mib} MiB (TCG)...")
        dom = start(env, env.define_guest("bench", guest, memory_mib=args.memory_mib), guest)
        name = dom.name()
        retrying(
            env,
            lambda: record_vdso_baseline(
                name,
                inputs.manifest,
                guest.kernel,
                args.workdir,
                conn=env.connection(),
                initrd_path=guest.initrd,
                disk=inputs.disk,
            ),
        )
        for run in range(args.runs):
            dom = env.connection().lookupByName(name)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            with memory_dump(dom, args.workdir) as dump:
                cold_wall, cold_rss, out = timed(
                    [PY, __file__, "--workdir", str(args.workdir), "--analyze-dump", str(dump.path)]
                )
                child = json.loads(out)
                warm = inspect_dump(dump.path, inputs, args.workdir)
                vol_wall, vol_rss, vol_out = timed([vol, "-q", "-f", str(dump.path), "banners.Banners"])
                assert "Linux version" in vol_out, vol_out[-500:]
                row = {
                    "dump": dump.seconds,
                    "dump_mib": dump.size / (1 << 20),
                    "analysis_cold_process": cold_wall,
                    "analysis_cold": child["wall"],
                    "analysis_warm": warm.timings["total"],
                    "warm_kernel": warm.timings.get("kernel", 0.0),
                    "warm_walk": warm.timings.get("analysis", 0.0),
                    "warm_elf_scan": warm.timings.get("elf_scan", 0.0),
                    "peak_rss_mib": cold_rss / 1024,
                    "vol_banners": vol_wall,
                    "vol_peak_rss_mib": vol_rss / 1024,
                }
            rows.append(row)
            log(f"run {run + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items()))
            if child["findings"] or warm.findings:
                log(f"  findings (expected none): {child['findings']} {[f.describe() for f in warm.findings]}")
            log(f"  processes listed: {child['processes']}")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    dump_s = med["dump"]
    print(f"\nmemory introspection, {args.memory_mib} MiB TCG guest, median of {args.runs} runs")
    print(f"  dump (libvirt memory-only ELF)       {dump_s:7.3f} s   ({med['dump_mib']:.0f} MiB file)")
    print(
        f"  analysis, fresh process (CLI)        {med['analysis_cold']:7.3f} s   (drgn import included; the process"
        f" with interpreter start and disk reference: {med['analysis_cold_process']:.3f} s; peak RSS"
        f" {med['peak_rss_mib']:.0f} MiB)"
    )
    print(
        f"  analysis, warm (daemon)              {med['analysis_warm']:7.3f} s   "
        f"(kernel facts {med['warm_kernel']:.3f}, walk {med['warm_walk']:.3f}, ELF scan {med['warm_elf_scan']:.3f})"
    )
    print(
        f"  total dump + analysis (CLI / daemon) {dump_s + med['analysis_cold']:7.3f} s / "
        f"{dump_s + med['analysis_warm']:.3f} s"
    )
    print(
        f"  volatility3 banners (same dump)      {med['vol_banners']:7.3f} s   "
        f"(process wall; peak RSS {med['vol_peak_rss_mib']:.0f} MiB)"
    )
    print("ratios")
    print(
        f"  analysis / dump: CLI {med['analysis_cold'] / dump_s:.2f}x, daemon {med['analysis_warm'] / dump_s:.2f}x,"
        f" CLI process {med['analysis_cold_process'] / dump_s:.2f}x  (goal: <= 2x)"
    )
    print(f"  peak host memory / guest memory: {med['peak_rss_mib'] / args.memory_mib:.2f}  (goal: < 1)")
    print(
        f"  volatility3 banners / hostguard analysis: {med['vol_banners'] / med['analysis_cold_process']:.1f}x"
        f" (process to process), {med['vol_banners'] / med['analysis_warm']:.1f}x (daemon)"
    )
    print(json.dumps({"runs": rows, "median": med}))
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    raise SystemExit(main())
