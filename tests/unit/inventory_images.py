"""Small ext2/3/4 images for the inventory unit tests, built in seconds with `mkfs.ext4 -d` (no mounting).

`write_tree(dest)` writes a tree that exercises every branch of the component rule and of the reader
(hard links, symlinks, sparse and multi-extent files, non-UTF-8 names, setuid/setgid, a file capability,
module and /boot names, an empty file, a deep directory). `expected_components(tree)` is the oracle:
the tree read back from the host side with the test bed's own rule, independent of hostguard's reader.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hostguard.signed.manifest import FileEntry, decode_path, encode_path
from tests.testbed import content
from tests.testbed.prereq import require, require_root

ELF_LIB = Path("/usr/lib/x86_64-linux-gnu/libBrokenLocale.so.1")


def require_tools() -> None:
    require_root()
    for tool in ("mkfs.ext4", "qemu-img", "setcap"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")


def run(*cmd: str | os.PathLike[str], stdin: bytes | None = None, env: dict[str, str] | None = None) -> None:
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.run([os.fspath(c) for c in cmd], input=stdin, capture_output=True, check=False, env=full_env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace')[-1000:]}")


def _file(root: Path, rel: bytes, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path = Path(os.fsdecode(os.fsencode(root) + b"/" + rel))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def write_tree(root: Path, *, big_mib: int = 3) -> None:
    """A tree covering the rule and the reader's hard cases."""
    root.mkdir(parents=True, exist_ok=True)
    busybox = Path("/bin/busybox").read_bytes()
    _file(root, b"bin/busybox", busybox, 0o755)
    os.link(root / "bin/busybox", root / "bin/busybox-link")  # hard link: an entry of its own
    (root / "bin/sh").symlink_to("busybox")  # symlink: never an entry
    (root / "lib-dir-link").symlink_to("usr/lib")  # symlink to a directory: not followed
    _file(root, b"usr/lib/libfoo.so.1", ELF_LIB.read_bytes(), 0o644)  # ELF without x bit: present
    _file(root, b"usr/share/data.txt", b"just data\n", 0o644)  # data without x bit: absent
    _file(root, b"usr/share/empty", b"", 0o644)  # empty data file: absent
    _file(root, b"usr/bin/empty-script", b"", 0o755)  # empty but executable: present
    _file(root, b"usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755)
    _file(root, b"usr/bin/sgid-noexec", b"setgid, no x bit\n", 0o2644, gid=50)
    _file(root, b"home/user/tool", b"#!/bin/sh\n", 0o700, uid=1000, gid=1000)
    cap = _file(root, b"usr/bin/ping", busybox[: 64 * 1024], 0o755)
    run("setcap", "cap_net_raw,cap_net_admin=ep", cap)
    capx = _file(root, b"usr/bin/cap-noexec", b"capability, no x\n", 0o644)
    run("setcap", "cap_sys_admin=p", capx)
    _file(root, b"lib/modules/6.1.0/kernel/x.ko", b"not really elf\n", 0o644)
    _file(root, b"lib/modules/6.1.0/kernel/y.ko.xz", b"xz\n", 0o644)
    _file(root, b"lib/modules/6.1.0/kernel/z.ko.zst", b"zst\n", 0o644)
    _file(root, b"lib/modules/6.1.0/modules.dep", b"kernel/x.ko:\n", 0o644)  # absent
    _file(root, b"boot/vmlinuz-6.1.0", b"kernel image\n" * 100, 0o644)
    _file(root, b"boot/initrd.img-6.1.0", b"initrd\n" * 100, 0o644)
    _file(root, b"boot/config-6.1.0", b"CONFIG_X=y\n", 0o644)  # absent
    _file(root, b"etc/vmlinuz-not-boot", b"name alone outside /boot\n", 0o644)  # absent
    _file(root, b"opt/bad\xff\xfename", b"#!/bin/sh\necho bad name\n", 0o755)  # not UTF-8
    _file(root, b"opt/caf\xc3\xa9", b"#!/bin/sh\n", 0o755)  # UTF-8, not ASCII
    _file(root, b"opt/percent%41", b"#!/bin/sh\n", 0o755)  # a literal % must round-trip
    deep = b"d/" * 40
    _file(root, deep + b"deep-tool", b"#!/bin/sh\n", 0o755)
    # Multi-extent and sparse content: a hole at the start, data, a hole, data.
    big = _file(root, b"usr/bin/big", b"", 0o755)
    with big.open("r+b") as fh:
        fh.seek(1 << 20)
        fh.write(os.urandom(big_mib << 20))
        fh.seek((big_mib + 3) << 20)
        fh.write(b"\x7fELF tail")
    sparse = _file(root, b"usr/bin/sparse", b"", 0o755)
    with sparse.open("r+b") as fh:
        fh.truncate(5 << 20)
    many = root / "many"
    many.mkdir()
    for i in range(300):  # a directory spanning several blocks (an htree with dir_index)
        _file(root, f"many/prog-{i:04d}".encode(), f"#!/bin/sh\necho {i}\n".encode(), 0o755)


def sparse_copy(src: Path, dst: Path) -> Path:
    """`shutil.copyfile` that keeps `src`'s holes: only its data is read and written (SEEK_DATA, in the
    kernel by copy_file_range). The bytes are the same; a 320 MiB image with 65 MiB of data copies in ~20 ms,
    not ~700 ms, and the copy takes no more disk than the original."""
    with src.open("rb") as fi, dst.open("wb") as fo:
        i, o = fi.fileno(), fo.fileno()
        size = os.fstat(i).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(i, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                break
            end = os.lseek(i, pos, os.SEEK_HOLE)
            while pos < end:
                try:
                    n = os.copy_file_range(i, o, end - pos, pos, pos)
                except OSError:  # another filesystem, an old kernel: through user space
                    n = os.pwrite(o, os.pread(i, min(end - pos, 1 << 20), pos), pos)
                if n == 0:
                    raise OSError(f"{src}: short copy at {pos}")
                pos += n
        fo.truncate(size)
    return dst


def write_at(path: Path, blocks: dict[int, bytes]) -> None:
    """Write each block at its offset in `path` (a fuzz test's one copy of an image: an example writes its
    mutations, then the original bytes back)."""
    with path.open("r+b") as fh:
        for off, block in blocks.items():
            fh.seek(off)
            fh.write(block)


def flipped(original: bytes, targets: list[int], flips: list[tuple[int, int]]) -> dict[int, bytes]:
    """The bytes `flips` change, by offset: each (pick, xor) XORs the byte at `targets[pick % len(targets)]`
    (a byte picked twice takes both)."""
    out: dict[int, int] = {}
    for pick, xor in flips:
        at = targets[pick % len(targets)]
        out[at] = out.get(at, original[at]) ^ xor
    return {at: bytes([b]) for at, b in out.items()}


def fuzz_copy(path: Path, original: bytes) -> Path:
    """`path` holding `original`: written on the first example of a test run only (see `write_at`)."""
    if not path.exists():
        path.write_bytes(original)
    return path


def getcap(path: bytes) -> str | None:
    """The capability text as the host's getcap prints it (the oracle for hostguard.imagefs.capabilities)."""
    proc = subprocess.run(["getcap", os.fsdecode(path)], capture_output=True, check=True, text=True)
    line = proc.stdout.strip()
    return line.split(" ", 1)[1] if line else None


def expected_components(tree: Path, prefix: bytes = b"") -> dict[str, FileEntry]:
    """Manifest entries the inventory must produce for `tree` (read from the host side), keyed by path."""
    out: dict[str, FileEntry] = {}
    for path, e in content.expect_tree(tree).items():
        if not e.executable_component:
            continue
        raw = decode_path(path)
        caps = getcap(os.fsencode(tree) + raw) if e.capabilities is not None else None
        full = encode_path(prefix + raw)
        out[full] = FileEntry(full, e.sha256, e.size, e.mode, e.uid, e.gid, caps)
    return out


def make_ext(
    tree: Path, out: Path, *, mkfs: str = "mkfs.ext4", options: tuple[str, ...] = (), size_mb: int = 64
) -> Path:
    out.unlink(missing_ok=True)
    run(mkfs, "-q", "-F", *options, "-d", tree, out, f"{size_mb}M")
    return out


def to_qcow2(raw: Path, out: Path, *, compress: bool = False) -> Path:
    out.unlink(missing_ok=True)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []), raw, out)
    return out


# mkfs.xfs refuses filesystems under 300 MiB except under fstests (these variables): small fuzz images.
SMALL_XFS_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def make_xfs(tree: Path, out: Path, *, options: tuple[str, ...] = (), size_mb: int = 320) -> Path:
    """An XFS image of `tree`: mkfs.xfs, then a loop mount and `cp -a` (keeps hard links, modes, owners
    and security.capability, which `mkfs.xfs -p` cannot set). Unmounted even on failure."""
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs is not installed (xfsprogs)")
    out.unlink(missing_ok=True)
    with out.open("wb") as fh:
        fh.truncate(size_mb << 20)
    run("mkfs.xfs", "-q", "-f", *options, out, env=SMALL_XFS_ENV if size_mb < 300 else None)
    populate_by_mount(tree, out)
    return out


def populate_by_mount(tree: Path, device: Path) -> None:
    """Copy `tree` into the filesystem on `device` (an image file or a block device) through a mount."""
    mnt = device.parent / (device.name + ".mnt")
    mnt.mkdir(exist_ok=True)
    run("mount", *(["-o", "loop"] if device.is_file() else []), device, mnt)
    try:
        run("cp", "-a", "--", f"{tree}/.", mnt)
    finally:
        run("umount", mnt)
        mnt.rmdir()


# --- LVM2 -------------------------------------------------------------------------------------------------

# The host has no device-mapper: LVM writes metadata only (`--driverloaded n`, no activation, no zeroing),
# no backup/archive files under /etc/lvm, no udev.
LVM_CONFIG = "backup { backup=0 archive=0 } activation { udev_sync=0 udev_rules=0 } devices { scan_lvs=0 }"
LVM_ENV = {"DM_DISABLE_UDEV": "1", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def lvm(*args: str | os.PathLike[str]) -> str:
    cmd = [args[0], "--driverloaded", "n", "--config", LVM_CONFIG, *args[1:]]
    proc = subprocess.run(
        [os.fspath(c) for c in cmd], capture_output=True, check=False, env={**os.environ, **LVM_ENV}, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {proc.stderr.decode(errors='replace')[-1000:]}")
    return proc.stdout.decode()


def make_lvm(
    image: Path, offset: int, size: int, vg: str, lvs: list[tuple[str, int]], extend: tuple[str, int] | None = None
) -> dict[str, list[tuple[int, int, int]]]:
    """Make `image`[offset:offset+size] an LVM2 PV of volume group `vg` with linear LVs (name, MiB), then
    grow one LV (a second segment). Returns each LV's (LV byte offset, image byte offset, length) runs as
    LVM's own `lvs` reports them. The loop device is detached even on failure."""
    require(shutil.which("lvcreate") is not None, "lvcreate is not installed (lvm2)")
    proc = subprocess.run(
        ["losetup", "-f", "--show", "--offset", str(offset), "--sizelimit", str(size), os.fspath(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    loop = proc.stdout.strip()
    try:
        lvm("pvcreate", "-q", "-y", loop)
        lvm("vgcreate", "-q", "-y", vg, loop)
        for name, mib in lvs:
            lvm("lvcreate", "-q", "-y", "-an", "-Zn", "-n", name, "-L", f"{mib}M", vg)
        if extend is not None:
            lvm("lvextend", "-q", "-L", f"{extend[1]}M", f"{vg}/{extend[0]}")
        pe_start = int(lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", loop).split()[0])
        extent = int(lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg).split()[0])
        table = lvm(
            "lvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "--separator",
            ",",
            "-o",
            "lv_name,seg_start,seg_size,seg_pe_ranges",
            vg,
        )
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    runs: dict[str, list[tuple[int, int, int]]] = {}
    for line in table.split():
        name, start, length, pe_range = line.split(",")
        first = int(pe_range.rpartition(":")[2].split("-")[0])
        runs.setdefault(name, []).append((int(start), offset + pe_start + first * extent, int(length)))
    return runs


def write_into_lv(image: Path, runs: list[tuple[int, int, int]], content: Path) -> None:
    """Copy a filesystem image `content` into the LV's extents of a fresh sparse `image` (no device-mapper
    needed). Only `content`'s data is read (SEEK_DATA): its holes, like its zeros, are zeros there already."""
    with content.open("rb") as src, image.open("r+b") as dst:
        fd = src.fileno()
        for lv_off, img_off, length in runs:
            pos, end = lv_off, lv_off + length
            while pos < end:
                try:
                    pos = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
                while pos < stop:
                    data = os.pread(fd, min(1 << 20, stop - pos), pos)
                    if not data:
                        return
                    if data.count(0) != len(data):
                        dst.seek(img_off + pos - lv_off)
                        dst.write(data)
                    pos += len(data)


def overwrite_lv(image: Path, runs: Sequence[tuple[int, int, int]], content: Path) -> None:
    """Write `content` over the LV's extents of `image` (which holds an earlier version of it): only the
    1 MiB pieces that differ, so `image` keeps its holes and an overlay diff reads little."""
    with content.open("rb") as src, image.open("r+b") as dst:
        for lv_off, img_off, length in runs:
            for done in range(0, length, 1 << 20):
                new = os.pread(src.fileno(), min(1 << 20, length - done), lv_off + done)
                if new != os.pread(dst.fileno(), len(new), img_off + done):
                    os.pwrite(dst.fileno(), new, img_off + done)


# --- a RHEL-style disk: XFS and ext4 on LVM2 ----------------------------------------------------------

MIB = 1 << 20
BOOT_START, BOOT_SIZE = MIB, 64 * MIB
PV_START = BOOT_START + BOOT_SIZE
DISK_SIZE = 600 * MIB


GPT_LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # sgdisk 8300
GPT_LINUX_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"  # sgdisk 8e00


def _gpt(image: Path, second: str = GPT_LINUX_LVM) -> None:
    """A fresh sparse disk with the GPT `sgdisk -n 1:2048:+64M -t 1:8300 -n 2:0:0 -t 2:8e00` writes (partition 2
    of type `second`, up to the last usable sector), written by sfdisk: sgdisk sleeps a second after each write
    for a kernel to re-read the table, sfdisk a quarter."""
    require(shutil.which("sfdisk") is not None, "sfdisk is not installed (fdisk)")
    with image.open("wb") as fh:
        fh.truncate(DISK_SIZE)
    last = DISK_SIZE // 512 - 34  # the backup GPT's 33 sectors follow
    layout = (
        f"label: gpt\nfirst-lba: 34\nlast-lba: {last}\n"
        f"start={BOOT_START // 512}, size={BOOT_SIZE // 512}, type={GPT_LINUX_FS}\n"
        f"start={PV_START // 512}, size={last - PV_START // 512 + 1}, type={second}\n"
    )
    run("sfdisk", "--quiet", image, stdin=layout.encode())


def make_rhel_like(d: Path, vg: str) -> tuple[Path, dict[str, FileEntry]]:
    """A RHEL-style disk in `d`: GPT, /boot ext4 on partition 1, partition 2 an LVM PV of `vg` holding an
    XFS root (two segments) and an ext4 /home, placed by the root's fstab through /dev/mapper and /dev/VG
    names. Returns the raw image and the entries the inventory must give."""
    require_tools()
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs is not installed (xfsprogs)")
    root, home, boot = d / "root", d / "home", d / "bootparent" / "boot"  # the rule looks at /boot names
    write_tree(root)
    (root / "home").rename(home)
    (root / "home").mkdir()
    boot.parent.mkdir()
    shutil.move(root / "boot", boot)
    (root / "boot").mkdir()
    boot_img = make_ext(boot, d / "boot.ext4", size_mb=64)
    uuid = ext_uuid(boot_img)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/fstab").write_text(
        f"/dev/mapper/{vg}-root / xfs defaults 0 0\nUUID={uuid} /boot ext4 defaults 0 2\n"
        f"/dev/{vg}/home /home ext4 defaults 0 2\n"
    )
    image = d / "disk.raw"
    _gpt(image)
    pv_size = DISK_SIZE - PV_START - MIB  # leave the backup GPT alone
    runs = make_lvm(image, PV_START, pv_size, vg, [("root", 200), ("home", 64)], extend=("root", 400))
    assert len(runs["root"]) == 2, runs  # two segments: the reader must join them
    write_into_lv(image, runs["root"], make_xfs(root, d / "root.xfs", size_mb=400))
    write_into_lv(image, runs["home"], make_ext(home, d / "home.ext4", size_mb=64))
    write_into_lv(image, [(0, BOOT_START, BOOT_SIZE)], boot_img)
    expected = {
        **expected_components(root),
        **expected_components(home, b"/home"),
        **expected_components(boot.parent),
    }
    return image, expected


def ext_uuid(ext_image: Path) -> str:
    raw = ext_image.read_bytes()[1024 + 0x68 : 1024 + 0x78].hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


# --- a Fedora/openSUSE-style disk: a Btrfs root with subvolumes -----------------------------------------------


def btrfs_uuid(image: Path) -> str:
    with image.open("rb") as fh:
        fh.seek(0x10020)
        raw = fh.read(16).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def make_btrfs(
    d: Path,
    *,
    compress: str | None = None,
    mkfs_options: tuple[str, ...] = (),
    lvm_vg: str | None = None,
    set_default: bool = False,
    snapshot: bool = False,
) -> tuple[Path, dict[str, FileEntry]]:
    """A disk in `d`: GPT, /boot ext4 on partition 1, Btrfs on partition 2 (or on LV `root` of `lvm_vg`)
    made by mkfs.btrfs and populated by the kernel through a loop mount (`compress`: the mount's
    `compress-force=` algorithm, so every extent it can shrink is compressed; small files stay inline).
    Subvolumes `@` (the root), `@home` and `@var` (no default subvolume set, or with `set_default` `@` is the
    default subvolume and fstab mounts / without a subvolume option, as openSUSE does), placed by the root's
    fstab with `subvol=` and `subvolid=`; with `snapshot`, a read-only snapshot of `@` (its /etc/fstab
    included) at `@/.snapshots/1`, as snapper takes them; a subvolume nested in `@` at /srv/nested (placed
    through its parent); a file in the top level, which the guest does not see at a normal path. Returns the
    raw image and the entries the inventory must give."""
    require_tools()
    require(shutil.which("mkfs.btrfs") is not None, "mkfs.btrfs is not installed (btrfs-progs)")
    root, boot = d / "root", d / "bootparent" / "boot"
    write_tree(root)
    boot.parent.mkdir()
    shutil.move(root / "boot", boot)
    (root / "boot").mkdir()
    parts = {"home": d / "home", "var": d / "var"}
    for name, where in parts.items():
        if (root / name).exists():
            shutil.move(root / name, where)
        else:
            where.mkdir()
        (root / name).mkdir()
    _file(parts["var"], b"lib/app/run-me", b"#!/bin/sh\necho var\n", 0o755)
    nested = d / "nested"
    _file(nested, b"tool", Path("/bin/busybox").read_bytes()[: 200 * 1024], 0o755)
    top = d / "top"
    _file(top, b"toplevel-tool", b"#!/bin/sh\necho top\n", 0o755)
    boot_img = make_ext(boot, d / "boot.ext4", size_mb=64)
    fs = d / "root.btrfs"
    fs_mb = 400
    with fs.open("wb") as fh:
        fh.truncate(fs_mb * MIB)
    run("mkfs.btrfs", "-q", "-f", *mkfs_options, fs)
    uuid = btrfs_uuid(fs)
    mnt = d / "mnt"
    mnt.mkdir()
    run("mount", "-o", "loop" + (f",compress-force={compress}" if compress else ""), fs, mnt)
    try:
        for sub in ("@", "@home", "@var"):
            run("btrfs", "-q", "subvolume", "create", mnt / sub)
        (mnt / "@/srv").mkdir()
        run("btrfs", "-q", "subvolume", "create", mnt / "@/srv/nested")
        var_id = subprocess.run(
            ["btrfs", "inspect-internal", "rootid", mnt / "@var"], capture_output=True, text=True, check=True
        ).stdout.strip()
        root_opts = "defaults" if set_default else "subvol=@,compress=zstd"
        if set_default:
            run("btrfs", "subvolume", "set-default", mnt / "@")
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc/fstab").write_text(
            f"UUID={uuid} / btrfs {root_opts} 0 0\nUUID={ext_uuid(boot_img)} /boot ext4 defaults 0 2\n"
            f"UUID={uuid} /home btrfs subvol=/@home 0 0\nUUID={uuid} /var btrfs subvolid={var_id} 0 0\n"
        )
        for src, dest in ((root, "@"), (parts["home"], "@home"), (parts["var"], "@var"), (nested, "@/srv/nested")):
            run("cp", "-a", "--", f"{src}/.", mnt / dest)
        run("cp", "-a", "--", f"{top}/.", mnt)
        if snapshot:
            (mnt / "@/.snapshots").mkdir()
            run("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "@", mnt / "@/.snapshots/1")
    finally:
        run("umount", mnt)
        mnt.rmdir()
    image = d / "disk.raw"
    _gpt(image, GPT_LINUX_LVM if lvm_vg else GPT_LINUX_FS)
    if lvm_vg is None:
        write_into_lv(image, [(0, PV_START, fs_mb * MIB)], fs)
    else:
        runs = make_lvm(image, PV_START, DISK_SIZE - PV_START - MIB, lvm_vg, [("root", fs_mb)])
        write_into_lv(image, runs["root"], fs)
    write_into_lv(image, [(0, BOOT_START, BOOT_SIZE)], boot_img)
    part = f"lvm:{lvm_vg}:root" if lvm_vg else "disk0p2"
    expected = {
        **expected_components(root),
        **expected_components(parts["home"], b"/home"),
        **expected_components(parts["var"], b"/var"),
        **expected_components(nested, b"/srv/nested"),
        **expected_components(top, f"//{part}".encode()),
        **expected_components(boot.parent),
        **(expected_components(root, b"/.snapshots/1") if snapshot else {}),
    }
    return image, expected
