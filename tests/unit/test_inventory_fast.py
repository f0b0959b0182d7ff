"""The fast reader + inventory on real ext2/3/4 images built by mkfs (every layout variant we read), checked
against the source tree read from the host side, plus partitions, limits and refusals."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs import Limits
from hostguard.imagefs.extsuper import Superblock, parse_superblock
from hostguard.imagefs.inventory import InventoryResult, inventory
from hostguard.imagefs.readers import open_reader
from hostguard.signed.manifest import FileEntry, decode_path
from tests.testbed.prereq import require
from tests.unit import inventory_images as imgs


def run(path: Path, fmt: str = "raw", *, workers: int | None = None, limits: Limits | None = None) -> InventoryResult:
    kwargs = {"limits": limits} if limits is not None else {}
    with open_reader([(path, fmt)], "fast", **kwargs) as reader:
        return inventory(reader, workers=workers)


def by_path(result: InventoryResult) -> dict[str, FileEntry]:
    return {f.path: f for f in result.files}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    imgs.require_tools()
    root = tmp_path_factory.mktemp("inv") / "tree"
    imgs.write_tree(root)
    return root


@pytest.fixture(scope="module")
def expected(tree: Path) -> dict[str, FileEntry]:
    return imgs.expected_components(tree)


@pytest.fixture(scope="module")
def ext4_raw(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imgs.make_ext(tree, tmp_path_factory.mktemp("img") / "ext4.raw")


VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ext4": ("mkfs.ext4", ()),
    "ext4-inline-data": ("mkfs.ext4", ("-O", "inline_data")),
    "ext4-128-byte-inodes": ("mkfs.ext4", ("-I", "128")),
    "ext4-1024-byte-inodes": ("mkfs.ext4", ("-I", "1024")),
    "ext4-1k-blocks": ("mkfs.ext4", ("-b", "1024")),
    "ext4-no-metadata-csum": ("mkfs.ext4", ("-O", "^metadata_csum")),
    "ext4-meta-bg": ("mkfs.ext4", ("-O", "meta_bg,^resize_inode")),
    "ext4-32bit": ("mkfs.ext4", ("-O", "^64bit")),
    "ext4-ea-inode": ("mkfs.ext4", ("-O", "ea_inode")),
    "ext3": ("mkfs.ext3", ()),
    "ext2-1k-blocks": ("mkfs.ext2", ("-b", "1024")),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_ext_variant_matches_the_host_view(
    variant: str, tree: Path, expected: dict[str, FileEntry], tmp_path: Path
) -> None:
    mkfs, options = VARIANTS[variant]
    require(shutil.which(mkfs) is not None, f"{mkfs} is not installed")
    image = imgs.make_ext(tree, tmp_path / f"{variant}.raw", mkfs=mkfs, options=options)
    result = run(image)
    assert by_path(result) == expected
    assert result.reader == "fast"
    assert_superblock_fields_agree_with_dissect(image.read_bytes()[1024:2048])


def assert_superblock_fields_agree_with_dissect(raw: bytes) -> None:
    """Our struct offsets against dissect.extfs's C definition of `ext4_super_block` (an independent one)."""
    from dissect.extfs.c_ext import c_ext

    ours = parse_superblock(raw)
    theirs = c_ext.ext4_super_block(raw)
    for name in Superblock._fields:
        want = getattr(theirs, name)
        want = tuple(want) if isinstance(want, list) else want
        assert getattr(ours, name) == want, name


@pytest.mark.parametrize("compress", [False, True], ids=["qcow2", "qcow2-compressed"])
def test_qcow2(compress: bool, ext4_raw: Path, expected: dict[str, FileEntry], tmp_path: Path) -> None:
    image = imgs.to_qcow2(ext4_raw, tmp_path / "disk.qcow2", compress=compress)
    assert by_path(run(image, "qcow2")) == expected


def test_specific_rule_cases(ext4_raw: Path) -> None:
    files = by_path(run(ext4_raw))
    assert files["/usr/lib/libfoo.so.1"].mode == 0o644  # ELF library without an x bit is listed
    assert "/usr/share/data.txt" not in files  # plain data without an x bit is not
    assert "/usr/share/empty" not in files and "/usr/bin/empty-script" in files
    assert "/bin/sh" not in files and "/lib-dir-link" not in files  # symlinks are not entries
    assert files["/bin/busybox-link"].sha256 == files["/bin/busybox"].sha256  # hard links, each listed
    assert files["/usr/bin/suid"].mode == 0o4755 and files["/usr/bin/suid"].setuid
    assert files["/usr/bin/sgid-noexec"].mode == 0o2644 and files["/usr/bin/sgid-noexec"].gid == 50
    assert files["/usr/bin/ping"].capabilities == "cap_net_admin,cap_net_raw=ep"
    assert files["/usr/bin/cap-noexec"].capabilities == "cap_sys_admin=p"
    assert files["/home/user/tool"].uid == 1000 and files["/home/user/tool"].mode == 0o700
    assert {"/lib/modules/6.1.0/kernel/x.ko", "/lib/modules/6.1.0/kernel/y.ko.xz"} <= files.keys()
    assert "/lib/modules/6.1.0/kernel/z.ko.zst" in files
    assert "/lib/modules/6.1.0/modules.dep" not in files
    assert {"/boot/vmlinuz-6.1.0", "/boot/initrd.img-6.1.0"} <= files.keys()
    assert "/boot/config-6.1.0" not in files and "/etc/vmlinuz-not-boot" not in files
    assert files["/usr/bin/sparse"].size == 5 << 20


def test_sparse_and_multi_extent_content(tree: Path, ext4_raw: Path) -> None:
    files = by_path(run(ext4_raw))
    for rel in ("usr/bin/sparse", "usr/bin/big"):
        want = hashlib.sha256((tree / rel).read_bytes()).hexdigest()
        assert files["/" + rel].sha256 == want


def test_non_utf8_name_round_trips(ext4_raw: Path) -> None:
    files = by_path(run(ext4_raw))
    assert "/opt/bad%FF%FEname" in files
    assert decode_path("/opt/bad%FF%FEname") == b"/opt/bad\xff\xfename"
    assert "/opt/café" in files and "/opt/percent%2541" in files
    assert decode_path("/opt/percent%2541") == b"/opt/percent%41"


def test_sorted_and_deterministic_whatever_the_thread_count(ext4_raw: Path) -> None:
    one = run(ext4_raw, workers=1)
    four = run(ext4_raw, workers=4)
    assert one.files == four.files
    assert list(one.files) == sorted(one.files, key=lambda f: f.path)
    assert one.hashed_files < len(one.files)  # the hard link was hashed once


@pytest.mark.parametrize("budget", [0, 3], ids=["no-read-plans", "plans-run-out"])
def test_read_plans_and_plain_streaming_give_the_same_digests(
    budget: int, ext4_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planned flat read loop and `read_chunks` (used past the plan budget) agree, on qcow2 as on raw."""
    qcow2 = imgs.to_qcow2(ext4_raw, tmp_path / "disk.qcow2")
    planned = (run(ext4_raw, workers=2).files, run(qcow2, "qcow2", workers=2).files)
    monkeypatch.setattr("hostguard.imagefs.inventory.PLAN_SEGMENTS", budget)
    streamed = (run(ext4_raw, workers=2).files, run(qcow2, "qcow2", workers=2).files)
    assert planned == streamed and planned[0] == planned[1]


# --- partitions and layout --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FileEntry]]:
    """GPT: p1 root (fstab mounts p2 at /boot by UUID; p3 is not in fstab), p2 boot, p3 data."""
    imgs.require_tools()
    require(shutil.which("sgdisk") is not None, "sgdisk (gdisk) is not installed")
    from tests.testbed import images

    base = tmp_path_factory.mktemp("gpt")
    boot_uuid = "2b1c3a4e-5f60-4718-8a9b-0c1d2e3f4a5b"
    root, boot, data = base / "root", base / "boot", base / "data"
    imgs.write_tree(root, big_mib=1)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/fstab").write_text(
        "# comment\nLABEL=root / ext4 defaults 0 1\n"
        f"UUID={boot_uuid} /boot ext4 ro 0 2\n/dev/sdb1 /mnt/other ext4 defaults 0 0\nproc /proc proc defaults 0 0\n"
    )
    for d, files in ((boot, {"vmlinuz-7": b"k\n", "initrd.img-7": b"i\n", "grub.cfg": b"x\n"}), (data, {"tool": b"t"})):
        d.mkdir()
        for name, body in files.items():
            (d / name).write_bytes(body)
            (d / name).chmod(0o644)
    (data / "tool").chmod(0o755)
    rootfs = imgs.make_ext(root, base / "root.img", options=("-L", "root"), size_mb=48)
    bootfs = imgs.make_ext(boot, base / "boot.img", options=("-U", boot_uuid), size_mb=8)
    datafs = imgs.make_ext(data, base / "data.img", size_mb=8)
    disk = images.make_gpt_disk([rootfs, bootfs, datafs], base / "disk.raw")
    expected = imgs.expected_components(root)
    # The root's own /boot is hidden under the boot filesystem: its files are named by locator.
    for path in [p for p in expected if p.startswith("/boot/")]:
        entry = expected.pop(path)
        expected["//disk0p1" + path] = FileEntry("//disk0p1" + path, *_rest(entry))
    for name in ("vmlinuz-7", "initrd.img-7"):  # components by name only once placed under /boot
        body = (boot / name).read_bytes()
        expected[f"/boot/{name}"] = FileEntry(f"/boot/{name}", hashlib.sha256(body).hexdigest(), len(body), 0o644, 0, 0)
    for path, entry in imgs.expected_components(data).items():
        expected["//disk0p3" + path] = FileEntry("//disk0p3" + path, *_rest(entry))
    return disk, expected


def _rest(e: FileEntry) -> tuple[str, int, int, int, int, str | None]:
    return (e.sha256, e.size, e.mode, e.uid, e.gid, e.capabilities)


def test_gpt_partitions_and_fstab_layout(gpt_disk: tuple[Path, dict[str, FileEntry]]) -> None:
    disk, expected = gpt_disk
    result = run(disk)
    assert [f.locator for f in result.filesystems] == ["disk0p1", "disk0p2", "disk0p3"]
    assert result.layout == {"disk0p1": "/", "disk0p2": "/boot"}
    assert by_path(result) == expected


def test_mbr_logical_partitions_are_numbered_from_5(tree: Path, tmp_path: Path) -> None:
    require(shutil.which("sfdisk") is not None, "sfdisk is not installed")
    fs = imgs.make_ext(tree, tmp_path / "fs.img", size_mb=40)
    disk = tmp_path / "mbr.raw"
    with disk.open("wb") as fh:
        fh.truncate(100 << 20)
    # p1: an empty primary of a non-Linux type (skipped), p2: the extended container, p5: the logical one.
    layout = "label: dos\nstart=2048, size=20480, type=7\nstart=22528, type=5\nstart=24576, size=86016, type=83\n"
    imgs.run("sfdisk", "--quiet", disk, stdin=layout.encode())
    start = 24576 * 512
    with disk.open("r+b") as dst, fs.open("rb") as src:
        dst.seek(start)
        shutil.copyfileobj(src, dst)
    result = run(disk)
    assert [f.locator for f in result.filesystems] == ["disk0p5"]
    assert result.layout == {"disk0p5": "/"}
    assert len(result.files) == len(imgs.expected_components(tree))


# --- refusals, corruption, limits -------------------------------------------------------------------------


def test_raw_image_that_looks_like_qcow2_is_refused(ext4_raw: Path, tmp_path: Path) -> None:
    q = imgs.to_qcow2(ext4_raw, tmp_path / "x.qcow2")
    with pytest.raises(ImageError, match=r"qcow2 magic"):
        run(q, "raw")


def test_qcow2_with_backing_file_is_refused(ext4_raw: Path, tmp_path: Path) -> None:
    base = imgs.to_qcow2(ext4_raw, tmp_path / "base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    imgs.run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", base, overlay)
    with pytest.raises(ImageError, match=r"backing file"):
        run(overlay, "qcow2")


def test_bigalloc_is_left_to_the_guestfs_reader(tree: Path, tmp_path: Path) -> None:
    image = imgs.make_ext(tree, tmp_path / "bigalloc.raw", options=("-O", "bigalloc", "-C", "16384"))
    with pytest.raises(ImageError, match=r"bigalloc.*use --reader guestfs"):
        run(image)


def test_unsupported_filesystem_names_the_guestfs_reader(tmp_path: Path) -> None:
    require(shutil.which("mkfs.vfat") is not None, "mkfs.vfat is not installed")
    image = tmp_path / "vfat.raw"
    with image.open("wb") as fh:
        fh.truncate(32 << 20)
    imgs.run("mkfs.vfat", image)
    with pytest.raises(ImageError, match=r"vfat.*--reader guestfs"):
        run(image)


def _corrupt(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    imgs.sparse_copy(src, dst)
    with dst.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    return dst


def test_corrupted_superblock_is_a_clean_error(ext4_raw: Path, tmp_path: Path) -> None:
    bad = _corrupt(ext4_raw, tmp_path / "bad.raw", 1024 + 0x78, b"garbage-label!!!")  # s_volume_name
    with pytest.raises(ImageError, match=r"bad\.raw.*offset 1024: ext superblock checksum mismatch"):
        run(bad)


def test_zeroed_superblock_is_a_clean_error(ext4_raw: Path, tmp_path: Path) -> None:
    bad = _corrupt(ext4_raw, tmp_path / "bad.raw", 1024, bytes(1024))
    with pytest.raises(ImageError, match=r"bad.raw"):
        run(bad)


def _inode_offset(image: Path, path: str) -> int:
    """Byte offset of `path`'s inode, asked of debugfs (e2fsprogs), not of hostguard."""
    out = subprocess.run(["debugfs", "-R", f"imap {path}", str(image)], capture_output=True, text=True, check=True)
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out.stdout)
    assert m, out.stdout
    stats = subprocess.run(["debugfs", "-R", "stats", str(image)], capture_output=True, text=True, check=True)
    bs = re.search(r"Block size:\s+(\d+)", stats.stdout)
    assert bs, stats.stdout
    return int(m.group(1)) * int(bs.group(1)) + int(m.group(2), 16)


def test_corrupted_inode_names_the_path(ext4_raw: Path, tmp_path: Path) -> None:
    require(shutil.which("debugfs") is not None, "debugfs is not installed")
    offset = _inode_offset(ext4_raw, "/usr/bin/suid")
    bad = _corrupt(ext4_raw, tmp_path / "bad.raw", offset + 4, b"\xff\xff\xff\x7f")  # i_size_lo
    with pytest.raises(ImageError, match=r"/usr/bin/suid: inode .* checksum mismatch"):
        run(bad)


def test_directory_cycle_is_detected(tree: Path, tmp_path: Path) -> None:
    require(shutil.which("debugfs") is not None, "debugfs is not installed")
    image = imgs.make_ext(tree, tmp_path / "cycle.raw", options=("-O", "^metadata_csum"))
    imgs.run("debugfs", "-w", "-R", "link /usr /usr/lib/loop", image)
    with pytest.raises(ImageError, match=r"cycle"):
        run(image)


def test_truncated_image_is_a_clean_error(ext4_raw: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.raw"
    with ext4_raw.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(4 << 20))
    with pytest.raises(ImageError, match=r"cut.raw"):
        run(cut)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (Limits(max_files=10), "more than 10 executable components"),
        (Limits(max_nodes=50), "more than 50 directory entries"),
        (Limits(max_path_bytes=60), "path longer than 60 bytes"),
        (Limits(max_file_bytes=1 << 20), "byte limit"),
    ],
)
def test_limits(limits: Limits, message: str, ext4_raw: Path) -> None:
    with pytest.raises(ImageError, match=message):
        run(ext4_raw, limits=limits)


def test_no_filesystem_at_all(tmp_path: Path) -> None:
    image = tmp_path / "zero.raw"
    with image.open("wb") as fh:
        fh.truncate(8 << 20)
    with pytest.raises(ImageError, match=r"no filesystem found"):
        run(image)


def test_progress_reports_final_totals(ext4_raw: Path) -> None:
    from hostguard.imagefs.inventory import Progress

    seen: list[Progress] = []
    with open_reader([(ext4_raw, "raw")], "fast") as reader:
        result = inventory(reader, progress=seen.append, progress_interval=0.0)
    last = seen[-1]
    assert not last.walking
    assert last.files_done == last.files_found == len(result.files)
    assert last.bytes_done == last.bytes_found == result.hashed_bytes  # distinct contents (hard links once)
