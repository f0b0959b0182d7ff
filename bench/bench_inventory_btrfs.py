"""Benchmark (issue 19): `hostguard manifest create` on Btrfs qcow2 images holding the same source tree as the
ext4 benchmark image (bench_inventory.py), side by side with the ext4 image and `virt-ls -lR --checksum=sha256`.

    .venv/bin/python bench/bench_inventory_btrfs.py [--workdir DIR] [--runs 3] [--skip-virt-ls]

The Btrfs images (Fedora's layout): GPT, partition 1 Btrfs made by mkfs.btrfs, subvolumes `@` (holding the
tree) and `@home`, no default subvolume, `/etc/fstab` in `@` mounting them with `subvol=`; populated through a
loop mount with `cp -a`, once uncompressed and once mounted with `compress=zstd:1` (Fedora's default mount
option: only extents that shrink are compressed). Built once in --workdir. Needs root.
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


def build_btrfs(workdir: Path, tree: Path, compress: str | None) -> Path:
    sys.path.insert(0, str(ROOT))  # the test bed's image builders
    from tests.unit import inventory_images as imgs

    name = f"bench-btrfs-{compress or 'plain'}".replace(":", "")
    qcow2 = workdir / f"{name}.qcow2"
    if qcow2.exists():
        return qcow2
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    fs_mb = max(600, int(size * 1.3 / MIB) + 400)
    raw = workdir / f"{name}.raw"
    with raw.open("wb") as fh:
        fh.truncate((fs_mb + 2) * MIB)
    imgs.run("sgdisk", "-n", "1:2048:0", "-t", "1:8300", raw)
    fs = workdir / f"{name}.fs"
    with fs.open("wb") as fh:
        fh.truncate(fs_mb * MIB)
    log(f"mkfs.btrfs ({fs_mb} MiB), cp -a into @ ({compress or 'no compression'})")
    imgs.run("mkfs.btrfs", "-q", "-f", fs)
    mnt = workdir / f"{name}.mnt"
    mnt.mkdir(exist_ok=True)
    imgs.run("mount", "-o", "loop" + (f",compress={compress}" if compress else ""), fs, mnt)
    try:
        for sub in ("@", "@home"):
            imgs.run("btrfs", "-q", "subvolume", "create", mnt / sub)
        imgs.run("cp", "-a", "--", f"{tree}/.", mnt / "@")
        (mnt / "@/etc").mkdir(exist_ok=True)
        uuid = imgs.btrfs_uuid(fs)
        opts = f",compress={compress}" if compress else ""
        (mnt / "@/etc/fstab").write_text(
            f"UUID={uuid} / btrfs subvol=@{opts} 0 0\nUUID={uuid} /home btrfs subvol=@home{opts} 0 0\n"
        )
    finally:
        imgs.run("umount", mnt)
        mnt.rmdir()
    imgs.write_into_lv(raw, [(0, MIB, fs_mb * MIB)], fs)
    fs.unlink()
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
    images = {"ext4": ext4, "btrfs": build_btrfs(args.workdir, tree, None)}
    images["btrfs-zstd"] = build_btrfs(args.workdir, tree, "zstd:1")
    warm(list(images.values()))
    times: dict[str, list[float]] = {name: [] for name in images}
    for _ in range(args.runs):
        for name, image in images.items():
            out = args.workdir / f"manifest-{name}.json"
            wall, _, _ = timed([PY, "-m", "hostguard.cli", "manifest", "create", str(image), "--name", "b",
                                "--version", "1", "--quiet", "-o", str(out)])  # fmt: skip
            times[name].append(wall)
        log(", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    counts = {name: (args.workdir / f"manifest-{name}.json").read_bytes().count(b'"path"') for name in images}
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("btrfs", "btrfs-zstd"):
        print(f"manifest create, median of {args.runs}: ext4 {med['ext4']:.2f} s, {name} {med[name]:.2f} s "
              f"(ratio {med[name] / med['ext4']:.2f}x, goal <= 1.5x); runs {times[name]}; "
              f"entries {counts[name]} (ext4 {counts['ext4']})")  # fmt: skip
    print(f"ext4 runs {times['ext4']}")
    if not args.skip_virt_ls:
        env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        image = images["btrfs-zstd"]
        wall, _, _ = timed(
            ["virt-ls", "-lR", "--checksum=sha256", "--format=qcow2", "-a", str(image), "-m", "/dev/sda1:/:subvol=@",
             "/"],
            env,
        )  # fmt: skip
        print(f"virt-ls -lR --checksum=sha256 on the Btrfs (zstd) image: {wall:.1f} s "
              f"({wall / med['btrfs-zstd']:.1f}x the fast reader, goal >= 10x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
