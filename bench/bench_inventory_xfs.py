"""Benchmark (issue 19): `hostguard manifest create` on an XFS-on-LVM qcow2 holding the same source tree as the
ext4 benchmark image (bench_inventory.py), side by side with the ext4 image and `virt-ls -lR --checksum=sha256`.

    .venv/bin/python bench/bench_inventory_xfs.py [--workdir DIR] [--runs 3] [--skip-virt-ls]

The XFS-on-LVM image: GPT, partition 1 an LVM2 PV, VG `bench` with one linear LV `root`, XFS on it (made by
mkfs.xfs, populated through a loop mount with `cp -a`; LVM metadata written by lvcreate without
device-mapper, the XFS image copied into the LV's extents). Built once in --workdir. Needs root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_inventory import PY, build, log, timed, warm

ROOT = Path(__file__).resolve().parents[1]

MIB = 1 << 20


def build_xfs_lvm(workdir: Path, tree: Path) -> Path:
    sys.path.insert(0, str(ROOT))  # the test bed's image builders
    from tests.unit import inventory_images as imgs

    qcow2 = workdir / "bench-xfs-lvm.qcow2"
    if qcow2.exists():
        return qcow2
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    lv_mb = max(400, int(size * 1.4 / MIB) + 200)
    xfs = imgs.make_xfs(tree, workdir / "root.xfs", size_mb=lv_mb)
    raw = workdir / "bench-xfs-lvm.raw"
    disk = (lv_mb + 16) * MIB
    with raw.open("wb") as fh:
        fh.truncate(disk)
    imgs.run("sgdisk", "-n", "1:2048:0", "-t", "1:8e00", raw)
    runs = imgs.make_lvm(raw, MIB, disk - 2 * MIB, "hgbench", [("root", lv_mb)])
    imgs.write_into_lv(raw, runs["root"], xfs)
    xfs.unlink()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    return qcow2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/hostguard-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-virt-ls", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tree, ext4, _listing = build(args.workdir)
    xfs = build_xfs_lvm(args.workdir, tree)
    warm([ext4, xfs])
    times: dict[str, list[float]] = {"ext4": [], "xfs-lvm": []}
    for _ in range(args.runs):
        for name, image in (("ext4", ext4), ("xfs-lvm", xfs)):
            out = args.workdir / f"manifest-{name}.json"
            wall, _, _ = timed([PY, "-m", "hostguard.cli", "manifest", "create", str(image), "--name", "b",
                                "--version", "1", "--quiet", "-o", str(out)])  # fmt: skip
            times[name].append(wall)
        log(", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    same = (args.workdir / "manifest-ext4.json").read_bytes().count(b'"path"') == (
        args.workdir / "manifest-xfs-lvm.json"
    ).read_bytes().count(b'"path"')
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"manifest create, median of {args.runs}: ext4 {med['ext4']:.2f} s, XFS on LVM {med['xfs-lvm']:.2f} s "
          f"(ratio {med['xfs-lvm'] / med['ext4']:.2f}x, goal <= 1.5x); same entry count: {same}")  # fmt: skip
    if not args.skip_virt_ls:
        env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        wall, _, _ = timed(
            ["virt-ls", "-lR", "--checksum=sha256", "--format=qcow2", "-a", str(xfs), "-m", "/dev/hgbench/root", "/"],
            env,
        )
        print(f"virt-ls -lR --checksum=sha256 on the XFS-on-LVM image: {wall:.1f} s "
              f"({wall / med['xfs-lvm']:.1f}x the fast reader, goal >= 10x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
