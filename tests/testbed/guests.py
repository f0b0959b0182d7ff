"""Real bootable test guests built from host packages in seconds, cached on disk by their inputs.

* `busybox_guest()`: the Debian kernel from /boot, a busybox-static initramfs that loads the virtio/ext4,
  qemu_fw_cfg and virtio_console (virtio-serial ports) modules, mounts the ext4 root disk /dev/vda read-only
  and switch_root's to its /sbin/init.
  The root disk holds the known content of `content.populate_root` (its expectations come with the guest).
* `python_guest()`: the same kernel and initramfs, with a root disk built from a supermin chroot of
  python3-minimal + python3-cryptography (+ its cffi backend) + busybox-static. Its init runs python3 and
  prints the marker.

Kernel command line (both): `console=ttyS0`, plus for the guest's init `hostguard.run=/path` (start a
program in the background, repeatable) and `hostguard.poweroff=1` (power off after the marker); for the
initramfs `hostguard.root=/dev/vdX` (another root device) and `hostguard.rw=1` (mount the root read-write).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.testbed import content, images

DEFAULT_CMDLINE = "console=ttyS0 panic=-1 loglevel=4"
PYTHON_MARKER = "HOSTGUARD-PYTHON-READY"
FAIL_MARKER = "HOSTGUARD-TESTBED-FAIL"
INITRAMFS_MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "ext4", "qemu_fw_cfg", "virtio_console")
BUSYBOX_ROOT_MB = 64
# python3-cffi-backend: python3-cryptography reaches it only through a virtual package, which supermin does not follow
PYTHON_PACKAGES = ("python3-minimal", "python3-cryptography", "python3-cffi-backend", "busybox-static")

INITRAMFS_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() {{ echo "{FAIL_MARKER}: $*" >/dev/console; sync; poweroff -f; }}
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed" >/dev/console
done
root=/dev/vda
opts=ro
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hostguard.root=*) root="${{arg#hostguard.root=}}" ;;
    hostguard.rw=1) opts=rw ;;
  esac
done
i=0
while [ ! -b "$root" ]; do
  i=$((i + 1))
  [ "$i" -gt 200 ] && fail "root device $root did not appear"
  sleep 0.05
done
mount -t ext4 -o "$opts" "$root" /newroot || fail "cannot mount $root"
[ -x /newroot/sbin/init ] || fail "no /sbin/init on $root"
mount --move /dev /newroot/dev || fail "cannot move /dev"
umount /proc /sys
exec switch_root /newroot /sbin/init
"""

PYTHON_INIT = f"""#!/usr/bin/busybox sh
export PATH=/usr/local/bin:/usr/bin:/usr/sbin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
[ -c /dev/null ] || busybox mount -t devtmpfs devtmpfs /dev
busybox mount -t tmpfs tmpfs /run
busybox mount -t tmpfs tmpfs /tmp
con=/dev/ttyS0
[ -c "$con" ] || con=/dev/console
poweroff_flag=0
for arg in $(busybox cat /proc/cmdline); do
  case "$arg" in
    hostguard.run=*) busybox setsid "${{arg#hostguard.run=}}" </dev/null >"$con" 2>&1 & ;;
    hostguard.poweroff=1) poweroff_flag=1 ;;
  esac
done
python3 -c 'import sys, cryptography; print("{PYTHON_MARKER} python=%d.%d.%d cryptography=%s"
  % (sys.version_info[:3] + (cryptography.__version__,)))' >"$con" 2>&1
echo "{content.MARKER} kernel=$(busybox uname -r) pid=$$" >"$con"
if [ "$poweroff_flag" = 1 ]; then
  busybox sync
  busybox poweroff -f
fi
while :; do busybox sleep 3600; done
"""


@dataclass(frozen=True)
class Guest:
    """A bootable guest: direct kernel boot of `kernel` + `initrd` with `cmdline`, root disk `root_qcow2`
    (or the same content as `root_raw`). The files live in the cache: never modify them, copy them."""

    name: str
    kernel: Path
    initrd: Path
    root_qcow2: Path
    root_raw: Path
    expected: dict[str, content.ExpectedFile] = field(compare=False, hash=False, repr=False)
    marker: str
    kernel_version: str
    cmdline: str = DEFAULT_CMDLINE


# --- kernel and initramfs -----------------------------------------------------------------------------------


def kernel_image(version: str) -> Path:
    path = Path("/boot") / f"vmlinuz-{version}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: install linux-image-amd64")
    return path


def module_closure(version: str, names: tuple[str, ...]) -> list[str]:
    """Module files (paths relative to /lib/modules/<version>) for `names` and their dependencies from
    modules.dep, in load order (dependencies first)."""
    moddir = Path("/lib/modules") / version
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        base = target.rsplit("/", 1)[-1].split(".ko", 1)[0]
        by_name[base] = target
        by_name[base.replace("-", "_")] = target
    order: list[str] = []

    def visit(target: str) -> None:
        if target in order:
            return
        for dep in reversed(deps.get(target, [])):  # modules.dep lists the closure, most-dependent first
            visit(dep)
        order.append(target)

    for name in names:
        found = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if found is None:
            if (moddir / "modules.builtin").exists() and name in (moddir / "modules.builtin").read_text():
                continue  # built into the kernel
            raise FileNotFoundError(f"kernel module {name} not found for {version}")
        visit(found)
    return order


def _uncompressed_name(rel: str) -> str:
    for suffix in (".xz", ".zst"):
        rel = rel.removesuffix(suffix)
    return rel


def write_cpio_gz(tree: Path, out: Path) -> None:
    """A reproducible newc cpio of `tree` (owner 0:0, sorted names), gzip-compressed."""
    names = [b"."]
    for dirpath, dirnames, filenames in os.walk(os.fsencode(tree)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, os.fsencode(tree))
        for n in sorted(dirnames + filenames):
            names.append(os.path.normpath(os.path.join(rel, n)))
    proc = subprocess.run(
        ["cpio", "--create", "--null", "--format=newc", "--owner=0:0", "--reproducible", "--quiet"],
        input=b"\0".join(names) + b"\0",
        cwd=tree,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
    with gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as gz:
        gz.write(proc.stdout)


def build_initramfs(
    version: str, out: Path, *, modules: tuple[str, ...] = INITRAMFS_MODULES, init: str = INITRAMFS_INIT
) -> Path:
    """The busybox initramfs (`modules` loaded, `init` as /init; other guests pass e.g. "xfs" and an init that
    mounts an XFS root)."""
    with tempfile.TemporaryDirectory(prefix="hgt-initramfs-") as tmp:
        tree = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
            (tree / d).mkdir(parents=True)
        shutil.copy2(content.BUSYBOX, tree / "bin/busybox")
        (tree / "init").write_text(init)
        (tree / "init").chmod(0o755)
        loaded = []
        for rel in module_closure(version, modules):
            dest = _uncompressed_name(rel).rsplit("/", 1)[-1]
            data = content.read_module(Path("/lib/modules") / version / rel)
            (tree / "lib/modules" / dest).write_bytes(data)
            loaded.append(dest)
        (tree / "modules.order").write_text("\n".join(loaded) + "\n")
        write_cpio_gz(tree, out)
    return out


def _boot_entry(version: str) -> Path:
    kernel = kernel_image(version)

    def build(d: Path) -> None:
        shutil.copyfile(kernel, d / "vmlinuz")
        build_initramfs(version, d / "initrd.img")
        for f in d.iterdir():
            f.chmod(0o644)

    key = [
        version,
        images.file_digest(kernel),
        *images.source_key("guests.py", "content.py", "images.py"),
        *images.package_versions("busybox-static", f"linux-image-{version}", "cpio"),
    ]
    return images.cached(key, build, name="boot")


# --- the guests ---------------------------------------------------------------------------------------------


def _root_files(d: Path) -> tuple[Path, Path]:
    return d / "root.raw", d / "root.qcow2"


def busybox_guest(kernel_version: str | None = None) -> Guest:
    """The busybox guest (built on first use, then from the cache)."""
    version = kernel_version or content.kernel_version()
    boot = _boot_entry(version)

    def build(d: Path) -> None:
        tree = d / "tree"
        expected = content.populate_root(tree, kver=version)
        raw, qcow2 = _root_files(d)
        images.make_ext4(tree, raw, BUSYBOX_ROOT_MB, label="hgt-busybox")
        images.to_qcow2(raw, qcow2)
        shutil.rmtree(tree)
        (d / "expected.json").write_text(content.expectations_to_json(expected))
        for f in d.iterdir():
            f.chmod(0o644)

    key = [
        version,
        *images.source_key("guests.py", "content.py", "images.py"),
        *images.package_versions(
            "busybox-static", "coreutils", "libc6", "e2fsprogs", "qemu-utils", f"linux-image-{version}"
        ),
    ]
    root = images.cached(key, build, name="busybox-root")
    raw, qcow2 = _root_files(root)
    return Guest(
        name="busybox",
        kernel=boot / "vmlinuz",
        initrd=boot / "initrd.img",
        root_qcow2=qcow2,
        root_raw=raw,
        expected=content.expectations_from_json((root / "expected.json").read_text()),
        marker=content.MARKER,
        kernel_version=version,
    )


def _installed_packages_digest() -> str:
    """Digest of every installed package version: supermin copies files of the whole dependency closure."""
    out = images.run(["dpkg-query", "-W", "-f=${Package}:${Architecture}=${Version}\n"])
    return hashlib.sha256(out.encode()).hexdigest()


def build_python_tree(dest: Path) -> None:
    """supermin --prepare + --build --format chroot into `dest`, then add the guest's init and applets."""
    with tempfile.TemporaryDirectory(prefix="hgt-supermin-") as tmp:
        prepared = Path(tmp) / "supermin.d"
        images.run(["supermin", "--prepare", *PYTHON_PACKAGES, "-o", prepared])
        images.run(["supermin", "--build", "--format", "chroot", prepared, "-o", dest])
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "usr/local/bin"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    for applet in ("sh", "cat", "ls", "ps", "sleep", "mount", "umount", "echo", "sync", "poweroff", "uname"):
        link = dest / "usr/local/bin" / applet
        if not link.exists():
            link.symlink_to("/usr/bin/busybox")
    init = dest / "usr/sbin/init"  # /sbin is a symlink to usr/sbin in the chroot
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_text(PYTHON_INIT)
    init.chmod(0o755)
    if not (dest / "sbin").exists():
        (dest / "sbin").symlink_to("usr/sbin")


def python_guest(kernel_version: str | None = None) -> Guest:
    """The python guest (supermin root with python3 + cryptography), built on first use, then cached."""
    version = kernel_version or content.kernel_version()
    boot = _boot_entry(version)

    def build(d: Path) -> None:
        tree = d / "tree"
        build_python_tree(tree)
        expected = content.expect_tree(tree)
        raw, qcow2 = _root_files(d)
        size_mb = max(192, 2 * sum(e.size for e in expected.values()) // (1 << 20) + 64)
        images.make_ext4(tree, raw, size_mb, label="hgt-python")
        images.to_qcow2(raw, qcow2)
        shutil.rmtree(tree)
        (d / "expected.json").write_text(content.expectations_to_json(expected))
        for f in d.iterdir():
            f.chmod(0o644)

    key = [
        version,
        *images.source_key("guests.py", "content.py", "images.py"),
        _installed_packages_digest(),
    ]
    root = images.cached(key, build, name="python-root")
    raw, qcow2 = _root_files(root)
    return Guest(
        name="python",
        kernel=boot / "vmlinuz",
        initrd=boot / "initrd.img",
        root_qcow2=qcow2,
        root_raw=raw,
        expected=content.expectations_from_json((root / "expected.json").read_text()),
        marker=PYTHON_MARKER,
        kernel_version=version,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.testbed.guests [busybox] [python]`: build (or find) the guests, print paths and times."""
    import sys
    import time

    names = (argv if argv is not None else sys.argv[1:]) or ["busybox", "python"]
    builders = {"busybox": busybox_guest, "python": python_guest}
    for name in names:
        started = time.monotonic()
        guest = builders[name]()
        print(f"{name}: {time.monotonic() - started:.2f} s, {len(guest.expected)} files")
        for label, path in (("kernel", guest.kernel), ("initrd", guest.initrd), ("root", guest.root_qcow2)):
            print(f"  {label:6} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
