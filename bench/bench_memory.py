"""Benchmark: the memory check reading guest RAM in place vs through a whole-RAM dump, side by side on the same
running guests of 512 MiB, 2 GiB and 8 GiB (TCG allocates lazily, so they fit this machine).

    .venv/bin/python bench/bench_memory.py [--runs 5] [--sizes 512,2048,8192] [--workdir DIR]

Per guest (the test bed's busybox guest, booted through the real libvirtd), each in a fresh child process as a
daemon would run it (imports, kernel facts cache warm), `--runs` checks after one first check:
  * in place (`inspect_domain_memory(method="in-place")`: the guest paused for the walk only), before any dump;
  * in place with `pause="on-inconsistency"` (the walk on the running guest; paused only to confirm);
  * the dump path (`method="dump"`: libvirt memory-only ELF dump, analysis, file removed);
  * in place again after the dumps (every untouched page is then mapped to the zero page in QEMU).
Reported: median check time (warm), the first check (VMCOREINFO scan), median time the guest was held paused,
the child's peak RSS (GNU time), bytes the child wrote to disk (/proc/self/io write_bytes) and the dump size.
Needs root, libvirtd and the test bed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
MODES = ("in-place", "in-place-live", "dump", "in-place-after-dump")
HOLDS = Path("/run/hostguard-bench-memory-holds")  # as the daemon's, in /run (tmpfs)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def inputs_for(guest: Any) -> Any:
    from hostguard.imagefs.readers import open_reader
    from hostguard.memory.diskref import disk_facts
    from hostguard.memory.inspect import Inputs
    from tests.integration.test_memory import manifest_for

    manifest = manifest_for(guest)
    with open_reader([(guest.root_qcow2, "qcow2")]) as reader:
        disk = disk_facts(reader, manifest)
    return Inputs(manifest, guest.kernel, guest.initrd, disk)


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def child(domain: str, mode: str, runs: int, workdir: Path) -> None:
    """One daemon-like process: a first check, then `runs` more; timings as JSON on stdout."""
    import libvirt

    from hostguard.memory.inspect import inspect_domain_memory
    from tests.testbed import guests

    inputs = inputs_for(guests.busybox_guest())
    conn = libvirt.open("qemu:///system")
    method = "dump" if mode == "dump" else "in-place"
    pause = "on-inconsistency" if mode == "in-place-live" else "always"
    written_before = written_bytes()
    rows = []
    for _ in range(runs + 1):
        report = inspect_domain_memory(
            domain,
            inputs.manifest,
            inputs.kernel_path,
            workdir,
            conn=conn,
            initrd_path=inputs.initrd_path,
            disk=inputs.disk,
            method=method,
            pause=pause,
            marker_dir=HOLDS,
        )
        assert report.findings == [], [f.describe() for f in report.findings]
        rows.append(
            {
                "total": report.timings["total"],
                "held": report.timings.get("held", report.timings.get("dump", 0.0)),
                "elf_scan": report.timings.get("elf_scan", 0.0),
                "walk": report.timings.get("walk", report.timings.get("analysis", 0.0)),
                "dump_bytes": report.dump_bytes,
                "bytes_read": report.bytes_read,
                "processes": len(report.snapshot.processes) if report.snapshot else 0,
            }
        )
    print(json.dumps({"rows": rows, "written": written_bytes() - written_before}))


def run_child(domain: str, mode: str, runs: int, workdir: Path) -> dict[str, Any]:
    argv = [PY, __file__, "--child", domain, "--mode", mode, "--runs", str(runs), "--workdir", str(workdir)]
    proc = subprocess.run(["/usr/bin/time", "-f", "HGMAXRSS=%M", *argv], capture_output=True, check=False)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {domain} failed: {err[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    result["peak_rss_mib"] = int(err.rsplit("HGMAXRSS=", 1)[1].split()[0]) / 1024
    return result


def summary(result: dict[str, Any]) -> dict[str, float]:
    warm = result["rows"][1:]
    return {
        "first": result["rows"][0]["total"],
        "median": statistics.median(r["total"] for r in warm),
        "held": statistics.median(r["held"] for r in warm),
        "elf_scan": statistics.median(r["elf_scan"] for r in warm),
        "walk": statistics.median(r["walk"] for r in warm),
        "peak_rss_mib": result["peak_rss_mib"],
        "written_kib": result["written"] / 1024,
        "dump_mib": statistics.median(r["dump_bytes"] for r in warm) / (1 << 20),
        "read_mib": statistics.median(r["bytes_read"] for r in warm) / (1 << 20),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="512,2048,8192")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/hostguard-bench-memory"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode, args.runs, args.workdir)
        return 0

    from tests.integration.test_memory import start
    from tests.testbed import guests
    from tests.testbed.libvirt_env import LibvirtEnv

    args.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    guest = guests.busybox_guest()
    results: dict[int, dict[str, dict[str, float]]] = {}
    with LibvirtEnv() as env:
        for mib in (int(x) for x in args.sizes.split(",")):
            log(f"booting the busybox guest with {mib} MiB (TCG)...")
            dom = start(env, env.define_guest(f"bench{mib}", guest, memory_mib=mib), guest)
            run_child(dom.name(), "in-place", 0, args.workdir)  # warm-up: the kernel facts cache a daemon has
            results[mib] = {}
            for mode in MODES:
                started = time.monotonic()
                results[mib][mode] = summary(run_child(dom.name(), mode, args.runs, args.workdir))
                log(
                    f"  {mode:20} {json.dumps({k: round(v, 4) for k, v in results[mib][mode].items()})}"
                    f" ({time.monotonic() - started:.0f} s)"
                )
            dom.destroy()
    print(f"\nmemory check, busybox TCG guest, median of {args.runs} warm checks (after a first one) per row")
    head = "| guest | path | check (median) | first check | held paused | peak RSS | written by the check | dump file |"
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for mib, modes in results.items():
        for mode, s in modes.items():
            print(
                f"| {mib} MiB | {mode} | {s['median']:.3f} s | {s['first']:.3f} s | {s['held'] * 1000:.1f} ms |"
                f" {s['peak_rss_mib']:.0f} MiB | {s['written_kib']:.0f} KiB | {s['dump_mib']:.0f} MiB |"
            )
    sizes = list(results)
    small, large = sizes[0], sizes[-1]
    inplace_large = results[large]["in-place"]["median"]
    print("\ntargets")
    print(f"  in-place {large} MiB median {inplace_large:.3f} s (goal <= 0.25 s)")
    print(f"  dump / in-place at {large} MiB: {results[large]['dump']['median'] / inplace_large:.1f}x (goal >= 20x)")
    print(f"  held paused, median: {results[large]['in-place']['held'] * 1000:.1f} ms (goal <= 50)")
    flat = inplace_large / results[small]["in-place"]["median"]
    print(f"  {large} MiB / {small} MiB in place: {flat:.2f}x (goal <= 1.5)")
    print(f"  peak RSS in place: {max(r['in-place']['peak_rss_mib'] for r in results.values()):.0f} MiB (goal < 150)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    raise SystemExit(main())
