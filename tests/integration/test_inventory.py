"""The image inventory on real images, with the real libguestfs appliance as the reference reader.

One appliance launch per image (session fixtures), images built once and cached on disk by their inputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hostguard.errors import ImageError
from hostguard.imagefs.inventory import InventoryResult, inventory
from hostguard.imagefs.readers import open_reader
from hostguard.signed.manifest import FileEntry, decode_path, parse_manifest
from tests.testbed import content, images
from tests.testbed.guests import Guest
from tests.testbed.prereq import require, require_root, require_tool

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
BOOT_LABEL = "hgt-boot"


def _require_guestfs() -> None:
    require_root()
    require(importlib.util.find_spec("guestfs") is not None, "python3-guestfs is not importable")
    require_tool("qemu-system-x86_64")


def _inventory(path: Path, fmt: str, reader: str) -> InventoryResult:
    with open_reader([(path, fmt)], reader) as opened:
        assert opened.name == reader or reader == "auto"
        return inventory(opened)


def _expected(expected: dict[str, content.ExpectedFile], rename: Callable[[str], str] = str) -> dict[str, FileEntry]:
    out = {}
    for e in expected.values():
        if e.executable_component:
            path = rename(e.path)
            out[path] = FileEntry(path, e.sha256, e.size, e.mode, e.uid, e.gid, e.capabilities)
    return out


def _files(result: InventoryResult) -> dict[str, FileEntry]:
    return {f.path: f for f in result.files}


# --- the busybox guest's root disk ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_fast(busybox_guest: Guest) -> InventoryResult:
    return _inventory(busybox_guest.root_qcow2, "qcow2", "fast")


@pytest.fixture(scope="session")
def busybox_guestfs(busybox_guest: Guest) -> InventoryResult:
    _require_guestfs()
    return _inventory(busybox_guest.root_qcow2, "qcow2", "guestfs")


def test_busybox_image_lists_exactly_the_expected_components(
    busybox_guest: Guest, busybox_fast: InventoryResult
) -> None:
    files = _files(busybox_fast)
    assert files == _expected(busybox_guest.expected)
    # The cases the test bed planted, one by one.
    busybox = hashlib.sha256(content.BUSYBOX.read_bytes()).hexdigest()
    assert files["/bin/busybox"].sha256 == busybox and files["/bin/busybox"].mode == 0o755
    assert files["/usr/bin/sleep"].sha256 == busybox  # hard link: its own entry
    assert "/bin/sh" not in files  # applet symlinks are not entries
    assert files["/usr/bin/suid-false"].mode == 0o4755 and files["/usr/bin/suid-false"].setuid
    assert files["/usr/bin/sgid-data"].mode == 0o2644 and files["/usr/bin/sgid-data"].gid == 50
    assert files["/usr/bin/ping-cap"].capabilities == "cap_net_raw=ep"
    assert files["/usr/lib/libBrokenLocale.so.1"].mode == 0o644  # ELF library without an x bit
    assert files["/home/user/user-tool"].uid == 1000 and files["/home/user/user-tool"].mode == 0o700
    assert decode_path("/opt/bad%FF name") == b"/opt/bad\xff name" and "/opt/bad%FF name" in files
    assert {"/boot/vmlinuz-test", "/boot/initrd.img-test"} <= files.keys()
    assert any(p.endswith("/kernel/test/dummy.ko") for p in files)
    for data in ("/etc/passwd", "/etc/shadow", "/srv/data.bin", "/srv/empty", "/boot/config-test"):
        assert data not in files
    assert files["/sbin/init"].sha256 == hashlib.sha256(content.INIT_SCRIPT.encode()).hexdigest()


def test_guestfs_reader_agrees_with_the_fast_reader(
    busybox_fast: InventoryResult, busybox_guestfs: InventoryResult
) -> None:
    assert busybox_guestfs.reader == "guestfs" and busybox_fast.reader == "fast"
    assert busybox_guestfs.files == busybox_fast.files
    assert busybox_guestfs.layout == busybox_fast.layout == {"disk0": "/"}


def test_manifest_create_gives_byte_identical_files(
    busybox_guest: Guest, busybox_guestfs: InventoryResult, tmp_path: Path
) -> None:
    outputs = []
    for n, reader in enumerate(("auto", "fast")):
        out = tmp_path / f"m{n}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "hostguard.cli", "manifest", "create", str(busybox_guest.root_qcow2),
             "--name", "busybox", "--version", "1", "--reader", reader, "--quiet", "-o", str(out)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outputs.append(out.read_bytes())
    files = [json.dumps(json.loads(o)["files"], sort_keys=True) for o in outputs]
    assert files[0] == files[1]
    assert parse_manifest(outputs[0]).files == busybox_guestfs.files


def test_corrupted_superblock_is_a_clean_error_for_both_readers(busybox_guest: Guest, tmp_path: Path) -> None:
    _require_guestfs()
    bad = tmp_path / "bad-superblock.raw"
    shutil.copyfile(busybox_guest.root_raw, bad)
    with bad.open("r+b") as fh:
        fh.seek(1024 + 0x78)  # s_volume_name: the superblock checksum no longer matches
        fh.write(b"tampered-label!!")
    with pytest.raises(ImageError, match=r"bad-superblock\.raw.*offset 1024: ext superblock checksum mismatch"):
        _inventory(bad, "raw", "fast")
    with pytest.raises(ImageError, match=r"bad-superblock\.raw") as caught:
        _inventory(bad, "raw", "guestfs")
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


# --- a partitioned (GPT) disk: root, /boot by LABEL in fstab, a data partition fstab does not name -----------


def _build_gpt(d: Path) -> None:
    root, boot, data = d / "root", d / "boot", d / "data"
    expected = content.populate_root(root)
    (root / "etc/fstab").write_text(f"LABEL=hgt-root / ext4 ro 0 1\nLABEL={BOOT_LABEL} /boot ext4 ro 0 2\n")
    boot.mkdir()
    for name, body in (("vmlinuz-gpt", b"gpt kernel\n"), ("initrd.img-gpt", b"gpt initrd\n"), ("grub.cfg", b"x\n")):
        (boot / name).write_bytes(body)
        (boot / name).chmod(0o644)
    data.mkdir()
    (data / "tool").write_bytes(b"#!/bin/sh\necho unplaced\n")
    (data / "tool").chmod(0o755)
    (data / "notes").write_bytes(b"not a component\n")
    parts = [
        images.make_ext4(root, d / "p1.img", 64, label="hgt-root"),
        images.make_ext4(boot, d / "p2.img", 8, label=BOOT_LABEL),
        images.make_ext4(data, d / "p3.img", 8, label="hgt-data"),
    ]
    raw = images.make_gpt_disk(parts, d / "gpt.raw")
    images.to_qcow2(raw, d / "gpt.qcow2")
    for p in [*parts, raw]:
        p.unlink()
    for tree in (root, boot, data):
        shutil.rmtree(tree)
    (d / "expected.json").write_text(content.expectations_to_json(expected))


@pytest.fixture(scope="session")
def gpt_image() -> tuple[Path, dict[str, FileEntry]]:
    require_root()
    for tool in ("mkfs.ext4", "qemu-img", "sgdisk"):
        require_tool(tool)
    key = [images.file_digest(HERE), *images.source_key("content.py", "images.py")]
    key += images.package_versions("e2fsprogs", "gdisk", "qemu-utils", "busybox-static", "coreutils", "libc6")
    d = images.cached(key, _build_gpt, name="inventory-gpt")

    def rename(path: str) -> str:  # the root's own /boot is hidden under the boot partition
        return "//disk0p1" + path if path.startswith("/boot/") else path

    expected = _expected(content.expectations_from_json((d / "expected.json").read_text()), rename)
    for name, body in (("vmlinuz-gpt", b"gpt kernel\n"), ("initrd.img-gpt", b"gpt initrd\n")):
        path = f"/boot/{name}"
        expected[path] = FileEntry(path, hashlib.sha256(body).hexdigest(), len(body), 0o644, 0, 0)
    body = b"#!/bin/sh\necho unplaced\n"
    expected["//disk0p3/tool"] = FileEntry("//disk0p3/tool", hashlib.sha256(body).hexdigest(), len(body), 0o755, 0, 0)
    return d / "gpt.qcow2", expected


@pytest.fixture(scope="session")
def gpt_fast(gpt_image: tuple[Path, dict[str, FileEntry]]) -> InventoryResult:
    return _inventory(gpt_image[0], "qcow2", "fast")


def test_gpt_image_partitions_and_fstab(
    gpt_image: tuple[Path, dict[str, FileEntry]], gpt_fast: InventoryResult
) -> None:
    assert [f.locator for f in gpt_fast.filesystems] == ["disk0p1", "disk0p2", "disk0p3"]
    assert gpt_fast.layout == {"disk0p1": "/", "disk0p2": "/boot"}
    assert _files(gpt_fast) == gpt_image[1]


def test_gpt_image_guestfs_agrees(gpt_image: tuple[Path, dict[str, FileEntry]], gpt_fast: InventoryResult) -> None:
    _require_guestfs()
    with open_reader([(gpt_image[0], "qcow2")], "guestfs") as reader:
        result = inventory(reader)  # digests are taken after all three walks: each needs its filesystem again
        assert [f.locator for f in result.filesystems] == ["disk0p1", "disk0p2", "disk0p3"]
        assert result.layout == gpt_fast.layout
        assert result.files == gpt_fast.files
        # Streaming content (used for first pages by the memory comparison) also re-mounts as needed.
        root, boot = reader.filesystems()[:2]
        tool = next(n for n in reader.walk(root) if n.path == b"/usr/local/bin/hello.sh")
        kernel = next(n for n in reader.walk(boot) if n.path == b"/vmlinuz-gpt")
        for node, path in ((kernel, "/boot/vmlinuz-gpt"), (tool, "/usr/local/bin/hello.sh")):
            data = b"".join(bytes(c) for c in reader.read_chunks(node))
            assert hashlib.sha256(data).hexdigest() == _files(result)[path].sha256


# --- what only libguestfs reads: "auto" falls back on it -------------------------------------------------


def _build_vfat_disk(d: Path) -> None:
    tree = d / "root"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    (tree / "usr/bin/tool").chmod(0o755)
    ext = images.make_ext4(tree, d / "p1.img", 8, label="hgt-ext")
    esp = d / "p2.img"
    with esp.open("wb") as fh:
        fh.truncate(33 << 20)
    images.run(["mkfs.vfat", "-F", "32", "-n", "HGTESP", esp])
    images.make_gpt_disk([ext, esp], d / "vfat.raw")
    ext.unlink()
    esp.unlink()
    shutil.rmtree(tree)


def test_auto_falls_back_on_guestfs_for_vfat() -> None:
    _require_guestfs()
    for tool in ("mkfs.ext4", "mkfs.vfat", "sgdisk"):
        require_tool(tool)
    key = [images.file_digest(HERE), *images.package_versions("e2fsprogs", "dosfstools", "gdisk")]
    image = images.cached(key, _build_vfat_disk, name="inventory-vfat") / "vfat.raw"
    with pytest.raises(
        ImageError, match=r"a FAT filesystem \(vfat\) is not readable by the fast reader; use --reader guestfs"
    ):
        _inventory(image, "raw", "fast")
    result = _inventory(image, "raw", "auto")
    assert result.reader == "guestfs"
    assert [(f.locator, f.fstype) for f in result.filesystems] == [("disk0p1", "ext4"), ("disk0p2", "vfat")]
    # Two filesystems, no fstab: both named by locator. The empty ESP has no files.
    body = b"#!/bin/sh\n"
    assert result.files == (FileEntry("//disk0p1/usr/bin/tool", hashlib.sha256(body).hexdigest(), 10, 0o755, 0, 0),)


# --- LVM2 and XFS: the fast reader against libguestfs -------------------------------------------------------


@pytest.fixture(scope="session")
def rhel_like_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FileEntry]]:
    from tests.unit import inventory_images as imgs

    return imgs.make_rhel_like(tmp_path_factory.mktemp("rhel"), f"hgi{os.getpid()}")


def test_xfs_on_lvm_guestfs_agrees_with_the_fast_reader(rhel_like_image: tuple[Path, dict[str, FileEntry]]) -> None:
    """XFS root and ext4 /home on LVM, /boot on a partition: both readers give the same manifest entries
    and layout, and the entries are the source trees'."""
    _require_guestfs()
    image, expected = rhel_like_image
    fast = _inventory(image, "raw", "auto")
    guestfs = _inventory(image, "raw", "guestfs")
    assert fast.reader == "fast" and guestfs.reader == "guestfs"
    assert _files(fast) == expected
    assert guestfs.files == fast.files
    assert guestfs.layout == fast.layout


# --- Btrfs with subvolumes: the fast reader against libguestfs (ADR 0022) ---------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        {"compress": "zstd"},
        {"compress": "lzo", "lvm_vg": f"hgbi{os.getpid()}"},
        {"compress": "zlib"},
        {},
        {"set_default": True, "snapshot": True},
    ],
    ids=["zstd", "lzo-on-lvm", "zlib", "plain", "default-subvolume"],
)
def test_btrfs_subvolumes_guestfs_agrees_with_the_fast_reader(
    variant: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A Btrfs root in subvolumes @, @home, @var (no default subvolume) placed by fstab `subvol=`/`subvolid=`,
    a nested subvolume, a top-level file, compressed and inline extents: the kernel inside libguestfs and the
    fast reader give the same entries (guest paths, not `//disk0p2/@/...`) and the same layout."""
    from tests.unit import inventory_images as imgs

    _require_guestfs()
    image, expected = imgs.make_btrfs(tmp_path_factory.mktemp("btrfs"), **variant)  # type: ignore[arg-type]
    fast = _inventory(image, "raw", "auto")
    guestfs = _inventory(image, "raw", "guestfs")
    assert fast.reader == "fast" and guestfs.reader == "guestfs"
    assert _files(fast) == expected
    assert guestfs.files == fast.files
    assert guestfs.layout == fast.layout
    assert guestfs.layout[next(f.locator for f in fast.filesystems if f.subvolume == "@")] == "/"
