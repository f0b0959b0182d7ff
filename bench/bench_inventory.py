"""Benchmark: `hostguard manifest create` on a >= 1 GiB qcow2 with >= 4,000 files, against
`virt-ls -lR --checksum=sha256` (libguestfs) on the same image and against the floor: hashing the same source
tree directly on the host with the same number of cores. Also peak memory (small image vs big image).

    .venv/bin/python bench/bench_inventory.py [--workdir DIR] [--sources DIR,...] [--runs 3] [--skip-virt-ls]

The source tree is copied from the host (/usr/lib/modules/<kernel>, /usr/bin, /usr/sbin, /usr/libexec,
/usr/lib/x86_64-linux-gnu: mostly executable components), built into ext4 with `mkfs.ext4 -d` and converted to
qcow2 once (kept in --workdir). Page cache is warmed before timing; each tool runs --runs times (virt-ls once)
and the median is reported. Needs root (mkfs.ext4 -d keeps ownership), qemu-img, libguestfs-tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SOURCES = ("/usr/lib/modules", "/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib/x86_64-linux-gnu")
FLOOR_SCRIPT = r"""
import hashlib, os, stat, sys
from concurrent.futures import ThreadPoolExecutor
listing, workers = sys.argv[1], int(sys.argv[2])
paths = open(listing, "rb").read().split(b"\0")[:-1]
def digest(p):
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()
with ThreadPoolExecutor(workers) as ex:
    n = sum(1 for _ in ex.map(digest, paths))
print(n)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB, from GNU time) and stdout of one run of `argv`."""
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "HGMAXRSS=%M", *argv], capture_output=True, env=env, check=False)
    wall = time.monotonic() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {err[-2000:]}")
    peak = int(err.rsplit("HGMAXRSS=", 1)[1].split()[0])
    return wall, peak, proc.stdout.decode()


def build(workdir: Path, sources: tuple[str, ...] = SOURCES) -> tuple[Path, Path, Path]:
    """(source tree, qcow2, listing of all distinct regular files) — built once, reused."""
    tree, raw, qcow2 = workdir / "tree", workdir / "bench.raw", workdir / "bench.qcow2"
    if not (workdir / "built").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        tree.mkdir(parents=True)
        for src in sources:
            dest = tree / src.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            log(f"copying {src}")
            subprocess.run(["cp", "-a", src, str(dest)], check=True)
        size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
        mb = int(size * 1.25 / 2**20) + 512
        log(f"mkfs.ext4 -d ({size / 2**30:.2f} GiB in the tree, {mb} MiB filesystem)")
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "bench", "-d", str(tree), str(raw), f"{mb}M"], check=True
        )
        log("qemu-img convert to qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
        raw.unlink()
        (workdir / "built").write_text("ok\n")
    listing = workdir / "all-files.list"
    seen: set[tuple[int, int]] = set()
    paths: list[bytes] = []
    for dirpath, _dirs, files in os.walk(os.fsencode(tree)):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                paths.append(p)
    listing.write_bytes(b"".join(p + b"\0" for p in paths))
    return tree, qcow2, listing


def warm(paths: list[Path]) -> None:
    for p in paths:
        subprocess.run(["sh", "-c", f"find '{p}' -type f -print0 | xargs -0 cat > /dev/null"], check=True)


def listed_files(manifest: Path, tree: Path, out: Path) -> int:
    """The listing of the distinct files the manifest names (the floor for exactly the tool's hashing work)."""
    from hostguard.signed.manifest import decode_path, parse_manifest

    m = parse_manifest(manifest.read_bytes())
    seen: set[tuple[int, int]] = set()
    paths = []
    for f in m.files:
        p = os.fsencode(tree) + decode_path(f.path)
        st = os.lstat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            paths.append(p)
    out.write_bytes(b"".join(p + b"\0" for p in paths))
    return len(paths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/hostguard-bench"))
    ap.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated host directories copied into the image (default: executable-heavy parts of /usr; "
        "'/usr' for the whole of it, with its data files). Use a --workdir of its own per choice.",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-virt-ls", action="store_true")
    ap.add_argument("--small-image", type=Path, help="a small qcow2 for the memory comparison")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    tree, qcow2, listing = build(args.workdir, tuple(args.sources.split(",")))
    n_files = listing.read_bytes().count(b"\0")
    tree_bytes = sum(os.lstat(p).st_size for p in listing.read_bytes().split(b"\0")[:-1])
    log(f"image {qcow2} ({qcow2.stat().st_size / 2**30:.2f} GiB), tree {n_files} files {tree_bytes / 2**30:.2f} GiB")
    warm([tree, qcow2])
    manifest = args.workdir / "manifest.json"
    create = [PY, "-m", "hostguard.cli", "manifest", "create", str(qcow2), "--name", "bench", "--version", "1",
              "--json", "-o", str(manifest)]  # fmt: skip
    inv_only = [PY, "-c", "import sys; from hostguard.commands.inventory_output import run_inventory; "
                f"run_inventory([({str(qcow2)!r}, 'qcow2')], reader='fast', quiet=True)"]  # fmt: skip
    # The work `create` cannot avoid: the listed files AND the image file itself (the disk digest), each a
    # SHA-256 stream of its own. The image goes first so that its single stream starts at once.
    with_image = args.workdir / "listed-plus-image.list"
    results: dict[str, list[float]] = {"create": [], "inventory": [], "inventory_in_process": [], "floor_all": [],
                                       "floor_listed": [], "floor_listed_plus_image": []}  # fmt: skip
    rss: dict[str, int] = {}
    summary: dict[str, object] = {}
    for i in range(args.runs):
        wall, peak, out = timed(create)
        results["create"].append(wall)
        rss["create"] = max(rss.get("create", 0), peak)
        summary = json.loads(out)
        results["inventory_in_process"].append(float(summary["seconds"]))  # type: ignore[arg-type]
        wall, peak, _ = timed(inv_only)
        results["inventory"].append(wall)
        rss["inventory"] = max(rss.get("inventory", 0), peak)
        if i == 0:
            listed = listed_files(manifest, tree, args.workdir / "listed-files.list")
            with_image.write_bytes(os.fsencode(qcow2) + b"\0" + (args.workdir / "listed-files.list").read_bytes())
        wall, peak, _ = timed([PY, "-c", FLOOR_SCRIPT, str(listing), str(cores)])
        results["floor_all"].append(wall)
        rss["floor_all"] = max(rss.get("floor_all", 0), peak)
        wall, _, _ = timed([PY, "-c", FLOOR_SCRIPT, str(args.workdir / "listed-files.list"), str(cores)])
        results["floor_listed"].append(wall)
        wall, _, _ = timed([PY, "-c", FLOOR_SCRIPT, str(with_image), str(cores)])
        results["floor_listed_plus_image"].append(wall)
        log(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()))
    if not args.skip_virt_ls:
        env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        log("virt-ls -lR --checksum=sha256 (libguestfs appliance, TCG) ...")
        wall, peak, out = timed(
            ["virt-ls", "-lR", "--checksum=sha256", "--format=qcow2", "-a", str(qcow2), "-m", "/dev/sda", "/"], env
        )
        results["virt_ls"] = [wall]
        rss["virt_ls"] = peak
        log(f"virt-ls: {wall:.1f}s, {out.count(chr(10))} lines")
    if args.small_image:
        _, peak, _ = timed([PY, "-m", "hostguard.cli", "manifest", "create", str(args.small_image), "--name", "s",
                            "--version", "1", "--quiet", "-o", str(args.workdir / "small.json")])  # fmt: skip
        rss["create_small_image"] = peak
    med = {k: statistics.median(v) for k, v in results.items()}
    hashed = int(summary["hashed_bytes"])  # type: ignore[call-overload]
    rows: list[tuple[str, float, int | None]] = [
        ("hostguard manifest create (auto -> fast)", med["create"], rss.get("create")),
        ("  inventory only (process, fast reader)", med["inventory"], rss.get("inventory")),
        ("  inventory only (inside create)", med["inventory_in_process"], None),
        ("floor: hash whole source tree, host", med["floor_all"], rss.get("floor_all")),
        ("floor: hash the listed files, host", med["floor_listed"], None),
        ("floor: listed files + the image file, host", med["floor_listed_plus_image"], None),
    ]
    if "virt_ls" in med:
        rows.append(("virt-ls -lR --checksum=sha256", med["virt_ls"], rss.get("virt_ls")))
    print(f"\nimage: {qcow2.stat().st_size / 2**30:.2f} GiB qcow2; source tree: {n_files} files, "
          f"{tree_bytes / 2**30:.2f} GiB; manifest: {summary['files']} entries, {listed} distinct files, "
          f"{hashed / 2**30:.2f} GiB hashed; {cores} cores; warm page cache; median of {args.runs}")  # fmt: skip
    print(f"{'what':44} {'seconds':>8} {'peak RSS MiB':>13}")
    for name, secs, peak_kib in rows:
        print(f"{name:44} {secs:8.2f} {peak_kib / 1024 if peak_kib else float('nan'):13.1f}")

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(results[a], results[b], strict=True))

    print("\nratios (median of per-run ratios: runs are paired, so machine noise cancels):")
    if "virt_ls" in med:
        print(f"  virt-ls / create               = {med['virt_ls'] / med['create']:6.1f}x  (goal >= 10x)")
    print(f"  create / floor (whole tree)    = {paired('create', 'floor_all'):6.2f}x  (goal <= 1.5x)")
    print(f"  create / floor (listed files + image file: the SHA-256 work create must do) = "
          f"{paired('create', 'floor_listed_plus_image'):6.2f}x")  # fmt: skip
    print(f"  inventory / floor (whole tree) = {paired('inventory', 'floor_all'):6.2f}x")
    print(f"  inventory / floor (listed)     = {paired('inventory', 'floor_listed'):6.2f}x")
    print(f"  inventory inside create / floor (listed) = {paired('inventory_in_process', 'floor_listed'):6.2f}x")
    if "create_small_image" in rss:
        print(
            f"  peak RSS: small image {rss['create_small_image'] / 1024:.1f} MiB vs big {rss['create'] / 1024:.1f} MiB"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps({"median_seconds": med, "peak_rss_kib": rss, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
