"""Benchmark the post-start disk check.

Part A (no VM): the disk-content stage's reading work on an overlay over a signed base, against a full
re-inventory of the same view (what the check would cost without the cached base index), side by side:

    unchanged       an empty overlay (what every check of a guest with a read-only root sees)
    guest-touched   a new directory and log file, committed to the ext4 journal only (needs recovery, as a
                    running read-write guest leaves its disk), written into the overlay with qemu-io
    tampered        the same plus a new setuid executable, also only in the journal

for the busybox test guest's root (64 MiB) and for the inventory benchmark's image (bench_inventory.py, >= 1 GiB,
>= 4,000 files; built there first, reused here). Timings are medians of interleaved rounds, warm page cache;
"incremental" includes opening the chain, the base and the view, and the index from memory (a running daemon)
or from the state directory (a fresh one).

Part B (real libvirtd, TCG): the busybox test guest started 20 times under a guarded host (the hostguard hook
installed) with an in-process `hostguard daemon`: from the STARTED event to the verdict applied, median and
slowest, and the share of each stage (verdict.stages_ms) plus queueing and applying. One start before them builds
the base index (reported apart).

Part C (no VM, issue 19): the unchanged-overlay check of an ext4 image and an XFS-on-LVM image of the same tree
(bench_inventory_xfs.py's pair, built there if missing), interleaved.

    .venv/bin/python bench/bench_postcheck.py [--rounds 5] [--starts 20] [--skip-big] [--skip-starts]
                                              [--on-start check|quarantine] [--rw] [--skip-images] [--json-out FILE]
                                              [--xfs-pair DIR] [--skip-xfs]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hostguard.imagefs import ImageSpec  # noqa: E402
from hostguard.imagefs.chain import LayerRecord, open_chain  # noqa: E402
from hostguard.imagefs.diskindex import DiskIndex, build_index  # noqa: E402
from hostguard.imagefs.fast import FastReader  # noqa: E402
from hostguard.imagefs.incremental import DeltaStats  # noqa: E402
from hostguard.imagefs.inventory import inventory  # noqa: E402
from hostguard.imagefs.overlayview import LazyBases, effective_files  # noqa: E402

BIG = Path("/var/tmp/hostguard-bench")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def layer(path: Path, fmt: str = "qcow2") -> LayerRecord:
    st = os.stat(path)
    return LayerRecord(path, fmt, st.st_dev, st.st_ino)


def run(*argv: str | os.PathLike[str]) -> None:
    subprocess.run([os.fspath(a) for a in argv], check=True, capture_output=True)


# --- part A: images ---------------------------------------------------------------------------------------------


def debugfs(image: Path, commands: list[str]) -> None:
    proc = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands).encode(),
                          capture_output=True, check=False)  # fmt: skip
    bad = [x for x in proc.stderr.decode(errors="replace").splitlines() if not x.startswith("debugfs ")]
    if proc.returncode or bad:
        raise RuntimeError(f"debugfs: {bad}")


def overlay_from_diff(base_qcow2: Path, base_raw: Path, target_raw: Path, out: Path) -> int:
    """An overlay holding exactly target's differing 4 KiB pieces (written by qemu-io). Returns bytes written."""
    out.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base_qcow2, out)
    commands: list[str] = []
    written = 0
    scratch = out.with_suffix(".pieces")
    scratch.mkdir(exist_ok=True)
    with base_raw.open("rb") as a, target_raw.open("rb") as b:
        off = 0
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if not x and not y:
                break
            for i in range(0, max(len(x), len(y)), 4096):
                if x[i : i + 4096] != y[i : i + 4096]:
                    piece = scratch / f"{off + i}"
                    piece.write_bytes(y[i : i + 4096])
                    commands += ["-c", f"write -q -s {piece} {off + i} 4096"]
                    written += 4096
            off += len(x)
    for start in range(0, len(commands), 400):
        run("qemu-io", "-f", "qcow2", *commands[start : start + 400], out)
    shutil.rmtree(scratch)
    return written


class Case:
    def __init__(self, name: str, base_qcow2: Path, top: Path, written: int) -> None:
        self.name, self.base, self.top, self.written = name, base_qcow2, top, written


def fs_block_size(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, check=True, text=True).stdout
    return int(next(x.split()[-1] for x in out.splitlines() if x.startswith("Block size:")))


def journal_only(raw: Path, target: Path, out: Path) -> None:
    """`out` = `raw` with target's changed blocks committed to the ext4 journal only (needs recovery): the state
    a running read-write guest leaves its disk in."""
    bs = fs_block_size(raw)
    blocks: list[int] = []
    data = bytearray()
    with raw.open("rb") as a, target.open("rb") as b:
        n = 0
        while True:
            x, y = a.read(bs), b.read(bs)
            if not x and not y:
                break
            if x != y:
                blocks.append(n)
                data += y
            n += 1
    subprocess.run(["cp", "--sparse=always", str(raw), str(out)], check=True)
    jdata = out.with_suffix(".jdata")
    jdata.write_bytes(bytes(data))
    debugfs(out, ["jo -c", f"jw -b {','.join(map(str, blocks))} {jdata}", "jc"])
    jdata.unlink()


def prepare_image(label: str, base_qcow2: Path, work: Path) -> list[Case]:
    """The three overlays of part A over `base_qcow2` (a raw copy of the base is made once for diffing)."""
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "base.raw"
    if not raw.exists():
        log(f"{label}: base to raw for diffing")
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", base_qcow2, raw)
    cases = []
    empty = work / "unchanged.qcow2"
    empty.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base_qcow2, empty)
    cases.append(Case("unchanged", base_qcow2, empty, 0))
    touched = ["mkdir /var-log-bench", "write /etc/os-release /var-log-bench/messages"]
    evil = ["write /usr/bin/true /usr/local-evil", "sif /usr/local-evil mode 0104755"]
    for name, commands in (("guest-touched", touched), ("tampered", touched + evil)):
        top = work / f"{name}.qcow2"
        marker = work / f"{name}.written"
        if not top.exists() or not marker.exists():
            log(f"{label}: building the {name} overlay (changes left in the ext4 journal)")
            target, dirty = work / f"{name}.raw", work / f"{name}-journal.raw"
            subprocess.run(["cp", "--sparse=always", str(raw), str(target)], check=True)
            debugfs(target, commands)
            journal_only(raw, target, dirty)
            marker.write_text(str(overlay_from_diff(base_qcow2, raw, dirty, top)))
            target.unlink()
            dirty.unlink()
        cases.append(Case(name, base_qcow2, top, int(marker.read_text())))
    return cases


def full_check(case: Case) -> int:
    with FastReader(disks=[open_chain([layer(case.top), layer(case.base)])], replay_journal=True) as view:
        return len(inventory(view).files)


def incremental_check(case: Case, index: DiskIndex) -> DeltaStats:
    """The daemon's disk stage once the index is known: `effective_files` over the recorded chain, the base
    opened as the daemon opens it (a backing file nobody writes; only if the overlay holds data: LazyBases)."""
    chain = [layer(case.top), layer(case.base)]
    with LazyBases([chain]) as bases:
        _files, stats = effective_files([chain], index, bases)
    return stats


def measure(case: Case, index: DiskIndex, index_file: Path, rounds: int) -> tuple[dict[str, float], DeltaStats]:
    """Median seconds of the full re-inventory and of the incremental check (index in memory / from JSON)."""
    samples: dict[str, list[float]] = {"full": [], "incremental": [], "incremental+load": []}
    stats = DeltaStats()
    for _ in range(rounds):
        start = time.perf_counter()
        full_check(case)
        samples["full"].append(time.perf_counter() - start)
        start = time.perf_counter()
        stats = incremental_check(case, index)
        samples["incremental"].append(time.perf_counter() - start)
        start = time.perf_counter()
        incremental_check(case, DiskIndex.from_json(json.loads(index_file.read_bytes())))
        samples["incremental+load"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}, stats


def part_a(images: list[tuple[str, Path]], rounds: int, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, base_qcow2 in images:
        subprocess.run(["cat", str(base_qcow2)], stdout=subprocess.DEVNULL, check=True)  # warm
        with FastReader([ImageSpec(base_qcow2, "qcow2")]) as reader:
            assert isinstance(reader, FastReader)
            start = time.perf_counter()
            index = build_index(reader, ["bench"])
            build_s = time.perf_counter() - start
        index_file = work / f"{label}.index.json"
        index_file.write_text(json.dumps(index.to_json(), separators=(",", ":")))
        for case in prepare_image(label, base_qcow2, work / label):
            med, stats = measure(case, index, index_file, rounds)
            row = {
                "image": label,
                "case": case.name,
                "overlay_written_bytes": case.written,
                "index_build_s": round(build_s, 3),
                "index_json_bytes": index_file.stat().st_size,
                "full_s": round(med["full"], 4),
                "incremental_s": round(med["incremental"], 4),
                "incremental_with_index_load_s": round(med["incremental+load"], 4),
                "ratio": round(med["incremental"] / med["full"], 4),
                "ratio_with_index_load": round(med["incremental+load"] / med["full"], 4),
                "delta": stats.to_json(),
            }
            rows.append(row)
            log(f"{label:8} {case.name:14} full {med['full']:.3f}s  incremental {med['incremental']:.4f}s "
                f"(+load {med['incremental+load']:.4f}s)  ratio {row['ratio']:.4f}  mode {stats.mode}")  # fmt: skip
    return rows


# --- part C: ext4 and XFS on LVM side by side -------------------------------------------------------------------


def part_c(pair_dir: Path, rounds: int, work: Path, btrfs: Path | None = None) -> list[dict[str, Any]]:
    """The unchanged-overlay check of the ext4 and XFS-on-LVM images of bench_inventory_xfs.py (the same tree),
    and of bench_inventory_btrfs.py's zstd Btrfs image (files-only index, ADR 0029) when given, interleaved
    round by round: index in memory, and index loaded from JSON (a fresh daemon)."""
    pair = [("ext4", pair_dir / "bench.qcow2"), ("xfs-lvm", pair_dir / "bench-xfs-lvm.qcow2")]
    if btrfs is not None:
        pair.append(("btrfs", btrfs))
    prepared = []
    for label, base in pair:
        subprocess.run(["cat", str(base)], stdout=subprocess.DEVNULL, check=True)  # warm
        with FastReader([ImageSpec(base, "qcow2")]) as reader:
            assert isinstance(reader, FastReader)
            start = time.perf_counter()
            index = build_index(reader, ["bench"])
            build_s = time.perf_counter() - start
        index_file = work / f"pair-{label}.index.json"
        index_file.write_text(json.dumps(index.to_json(), separators=(",", ":")))
        top = work / f"pair-{label}-unchanged.qcow2"
        top.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
        prepared.append((label, Case("unchanged", base, top, 0), index, index_file, build_s))
    samples: dict[str, dict[str, list[float]]] = {label: {"mem": [], "json": []} for label, *_ in prepared}
    stats: dict[str, DeltaStats] = {}
    for _ in range(rounds):
        for label, case, index, index_file, _ in prepared:
            start = time.perf_counter()
            stats[label] = incremental_check(case, index)
            samples[label]["mem"].append(time.perf_counter() - start)
            start = time.perf_counter()
            incremental_check(case, DiskIndex.from_json(json.loads(index_file.read_bytes())))
            samples[label]["json"].append(time.perf_counter() - start)
    rows = []
    for label, _case, index, index_file, build_s in prepared:
        rows.append({
            "image": label,
            "files": len(index.files),
            "index_build_s": round(build_s, 3),
            "index_json_bytes": index_file.stat().st_size,
            "unchanged_ms": round(statistics.median(samples[label]["mem"]) * 1000, 2),
            "unchanged_min_ms": round(min(samples[label]["mem"]) * 1000, 2),
            "unchanged_with_index_load_ms": round(statistics.median(samples[label]["json"]) * 1000, 1),
            "mode": stats[label].mode,
        })  # fmt: skip
    return rows


# --- part B: real starts ----------------------------------------------------------------------------------------


class _DiskLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_domain: dict[str, list[dict[str, Any]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if ": disk content: " in msg:
            name, doc = msg.split(": disk content: ", 1)
            self.by_domain.setdefault(name, []).append(json.loads(doc))


def part_b(starts: int, on_start: str, rw: bool) -> dict[str, Any]:
    import libvirt

    from hostguard.host.config import load_config
    from hostguard.poststart.daemon import Daemon
    from tests.testbed.guarded import GuardedHost
    from tests.testbed.guests import busybox_guest
    from tests.testbed.libvirt_env import LibvirtEnv

    guest = busybox_guest()
    disk_log = _DiskLog()
    logging.getLogger("hostguard.poststart.disk_stage").addHandler(disk_log)
    logging.getLogger("hostguard.poststart.disk_stage").setLevel(logging.INFO)

    class TimedDaemon(Daemon):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.started: dict[str, float] = {}
            self.done: dict[str, tuple[float, float, Any]] = {}

        def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
            if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                self.started.setdefault(dom.UUIDString(), time.monotonic())
            super()._on_lifecycle(conn, dom, event, detail, opaque)

        def check(self, uuid: str, trigger: str) -> Any:
            t0 = time.monotonic()
            verdict = super().check(uuid, trigger)
            if verdict is not None:
                self.done[uuid] = (t0, time.monotonic(), verdict)
            return verdict

    results: list[dict[str, Any]] = []
    with GuardedHost() as host:
        base = host.publish(guest, "busybox", 1)
        text = host.config.read_text()
        if on_start != "check":
            text = text.replace("[policy]\n", f'[policy]\non_start = "{on_start}"\n', 1)
        config_path = host.dir / "bench.toml"
        config_path.write_text(text)
        daemon = TimedDaemon(load_config(config_path))
        thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
        thread.start()
        while daemon.conn is None:
            time.sleep(0.1)
        with LibvirtEnv() as env:
            for i in range(starts + 1):
                dom = env.define_guest(f"pc{i}", guest, disk_path=env.overlay(base, f"pc{i}.qcow2"),
                                       cmdline_extra="hostguard.rw=1" if rw else "")  # fmt: skip
                uuid = dom.UUIDString()
                t_create = time.monotonic()
                dom.create()
                t_created = time.monotonic()
                deadline = time.monotonic() + 180
                while uuid not in daemon.done:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no verdict for start {i}")
                    time.sleep(0.01)
                t0, t1, verdict = daemon.done[uuid]
                t_event = daemon.started.get(uuid, t_created)
                disk = disk_log.by_domain.get(dom.name(), [{}])[-1]
                row = {
                    "start": i,
                    "status": verdict.status,
                    "event_to_verdict_ms": (t1 - t_event) * 1000,
                    "create_call_ms": (t_created - t_create) * 1000,
                    "queue_ms": (t0 - t_event) * 1000,
                    "check_ms": verdict.duration_ms,
                    "apply_record_ms": (t1 - t0) * 1000 - verdict.duration_ms,
                    "stages_ms": dict(verdict.stages_ms),
                    "disk_held_ms": disk.get("held_ms"),
                    "disk_mode": (disk.get("sets") or [{}])[0].get("mode"),
                    "disk_index": (disk.get("sets") or [{}])[0].get("index"),
                }
                results.append(row)
                log(f"start {i:2}: {row['status']} {row['event_to_verdict_ms']:.0f} ms "
                    f"(queue {row['queue_ms']:.0f}, check {row['check_ms']:.0f}, "
                    f"disk {verdict.stages_ms.get('disk-content', 0):.0f} held {row['disk_held_ms'] or 0:.0f}, "
                    f"index {row['disk_index']})")  # fmt: skip
                # The hook's notification may have queued a second check of the same start: let it finish.
                while daemon.queue.unfinished_tasks:
                    time.sleep(0.01)
                dom.destroy()
        daemon.stop.set()
        thread.join(timeout=10)
    steady = results[1:]
    totals = [r["event_to_verdict_ms"] for r in steady]
    parts: dict[str, float] = {"queue": sum(r["queue_ms"] for r in steady)}
    for r in steady:
        for stage, ms in r["stages_ms"].items():
            parts[stage] = parts.get(stage, 0.0) + ms
    parts["apply+record"] = sum(r["apply_record_ms"] for r in steady)
    whole = sum(totals)
    return {
        "on_start": on_start,
        "root": "read-write" if rw else "read-only",
        "first_start_with_index_build": results[0],
        "starts": len(steady),
        "all_pass": all(r["status"] == "pass" for r in results),
        "median_ms": statistics.median(totals),
        "slowest_ms": max(totals),
        "share": {k: round(v / whole, 4) for k, v in parts.items()},
        "median_stage_ms": {
            k: statistics.median(r["stages_ms"].get(k, 0.0) for r in steady) for k in steady[0]["stages_ms"]
        },
        "median_disk_held_ms": statistics.median(r["disk_held_ms"] or 0.0 for r in steady),
        "runs": results,
    }


def built_by(script: str, image: Path) -> Path:
    """`image`, built first (with the rest of its set) by the inventory benchmark `script` if it is missing."""
    if not image.exists():
        log(f"building the images in {image.parent} (bench/{script})")
        subprocess.run([sys.executable, str(ROOT / "bench" / script), "--workdir", str(image.parent), "--runs", "1",
                        "--skip-virt-ls"], check=True)  # fmt: skip
    return image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/hostguard-bench-postcheck"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-starts", action="store_true")
    ap.add_argument("--skip-images", action="store_true", help="only part B")
    ap.add_argument("--rw", action="store_true", help="part B guests mount their root read-write")
    ap.add_argument("--on-start", choices=("check", "quarantine"), default="check")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument(
        "--xfs-pair",
        type=Path,
        default=Path("/var/tmp/hostguard-bench-xfs"),
        help="part C: the ext4 and XFS-on-LVM images bench_inventory_xfs.py builds there",
    )
    ap.add_argument("--skip-xfs", action="store_true")
    ap.add_argument(
        "--btrfs-dir",
        type=Path,
        default=Path("/var/tmp/hostguard-bench-btrfs"),
        help="part C: where bench_inventory_btrfs.py builds its Btrfs images (the same tree)",
    )
    ap.add_argument("--skip-btrfs", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from tests.testbed.guests import busybox_guest

    images = [("busybox", busybox_guest().root_qcow2)]
    if not args.skip_big:
        if not (BIG / "built").exists():
            log("building the inventory benchmark's image first (bench/bench_inventory.py)")
            sys.path.insert(0, str(ROOT / "bench"))
            from bench_inventory import build

            build(BIG)
        images.append(("big", BIG / "bench.qcow2"))
    out: dict[str, Any] = {"cores": os.cpu_count()}
    out["part_a"] = [] if args.skip_images else part_a(images, args.rounds, args.workdir)
    if not args.skip_xfs:
        built_by("bench_inventory_xfs.py", args.xfs_pair / "bench-xfs-lvm.qcow2")
        btrfs = (
            None
            if args.skip_btrfs
            else built_by("bench_inventory_btrfs.py", args.btrfs_dir / "bench-btrfs-zstd1.qcow2")
        )
        out["part_c"] = part_c(args.xfs_pair, args.rounds, args.workdir, btrfs)
    if not args.skip_starts:
        out["part_b"] = part_b(args.starts, args.on_start, args.rw)
    print(f"\nPart A: disk check of an overlay vs a full re-inventory of the same view ({os.cpu_count()} cores, "
          f"warm page cache, median of {args.rounds} interleaved rounds)")  # fmt: skip
    print(f"{'image':8} {'overlay':14} {'written':>9} {'full s':>8} {'incr s':>8} {'+load s':>8} {'ratio':>7} mode")
    for r in out["part_a"]:
        print(f"{r['image']:8} {r['case']:14} {r['overlay_written_bytes'] / 1024:7.0f}Ki {r['full_s']:8.3f} "
              f"{r['incremental_s']:8.4f} {r['incremental_with_index_load_s']:8.4f} {r['ratio']:7.4f} "
              f"{r['delta']['mode']}")  # fmt: skip
    for label in dict.fromkeys(r["image"] for r in out["part_a"]):
        r = next(x for x in out["part_a"] if x["image"] == label)
        print(f"  {label}: base index built once in {r['index_build_s']:.2f} s ({r['index_json_bytes']} bytes JSON)")
    if "part_c" in out:
        print(f"\nPart C: unchanged overlay, ext4 vs XFS on LVM and Btrfs (same tree), median of {args.rounds} rounds")
        for r in out["part_c"]:
            print(f"  {r['image']:8} {r['files']} files: {r['unchanged_ms']:.2f} ms (index in memory; min "
                  f"{r['unchanged_min_ms']:.2f}), "
                  f"{r['unchanged_with_index_load_ms']:.1f} ms (index from JSON), mode {r['mode']}; "
                  f"index built in {r['index_build_s']:.2f} s")  # fmt: skip
        ext4, *others = out["part_c"]
        for other in others:
            print(
                f"  {other['image']} / ext4: {other['unchanged_ms'] / ext4['unchanged_ms']:.2f}x (index in memory; "
                f"minimums {other['unchanged_min_ms'] / ext4['unchanged_min_ms']:.2f}x), "
                f"{other['unchanged_with_index_load_ms'] / ext4['unchanged_with_index_load_ms']:.2f}x (from JSON)"
            )
    if "part_b" in out:
        b = out["part_b"]
        print(f"\nPart B: STARTED event -> verdict applied, busybox guest ({b['root']} root), {b['starts']} starts "
              f"(on_start={b['on_start']}): median {b['median_ms']:.0f} ms, slowest {b['slowest_ms']:.0f} ms, "
              f"all pass: {b['all_pass']}")  # fmt: skip
        print(f"  first start (base index built): {b['first_start_with_index_build']['event_to_verdict_ms']:.0f} ms")
        print("  share of the total time: " + ", ".join(f"{k} {v:.1%}" for k, v in b["share"].items()))
        print("  median per stage (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in b["median_stage_ms"].items()))
        print(f"  median time the domain was held suspended by the disk stage: {b['median_disk_held_ms']:.1f} ms")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
