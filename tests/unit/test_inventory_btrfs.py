"""The fast reader on Btrfs images built by mkfs.btrfs (populated by the kernel through a loop mount, with
subvolumes and compression), checked against the source trees read from the host side; what it does not read
is refused by name; hostile Btrfs metadata gives an `ImageError` (ADR 0022)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs import Limits, btrfsfs
from hostguard.imagefs.crc32c import crc32c_raw
from hostguard.imagefs.inventory import InventoryResult, inventory
from hostguard.imagefs.readers import open_reader
from tests.testbed.prereq import require
from tests.unit import inventory_images as imgs
from tests.unit.test_inventory_fuzz import _small_tree


def run(path: Path, fmt: str = "raw", *, limits: Limits | None = None) -> InventoryResult:
    kwargs = {"limits": limits} if limits is not None else {}
    with open_reader([(path, fmt)], "fast", **kwargs) as reader:
        return inventory(reader, workers=2)


def _require_btrfs() -> None:
    imgs.require_tools()
    require(shutil.which("mkfs.btrfs") is not None, "mkfs.btrfs is not installed (btrfs-progs)")


# Layouts: uncompressed; every algorithm the kernel writes, forced on every extent; 4 KiB tree nodes (deeper
# trees, more leaves); data and metadata in the same block groups; explicit hole extents (no `no-holes`); on an
# LVM logical volume; `@` as the default subvolume, mounted by fstab without options, with a snapshot of itself
# (a second /etc/fstab: the default subvolume is the root).
VARIANTS: dict[str, dict[str, object]] = {
    "plain": {},
    "zstd": {"compress": "zstd"},
    "lzo": {"compress": "lzo"},
    "zlib": {"compress": "zlib"},
    "4k-nodes": {"mkfs_options": ("-n", "4096")},
    "mixed-block-groups": {"mkfs_options": ("--mixed",), "compress": "zlib"},
    "hole-extents": {"mkfs_options": ("-O", "^no-holes"), "compress": "lzo"},
    "on-lvm": {"lvm_vg": f"hgb{os.getpid()}", "compress": "zstd"},
    "default-subvolume": {"set_default": True, "snapshot": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_btrfs_subvolumes_match_the_host_view(variant: str, tmp_path: Path) -> None:
    _require_btrfs()
    image, expected = imgs.make_btrfs(tmp_path, **VARIANTS[variant])  # type: ignore[arg-type]
    result = run(image)
    assert result.reader == "fast"
    assert {f.path: f for f in result.files} == expected
    part = f"lvm:{VARIANTS[variant]['lvm_vg']}:root" if "lvm_vg" in VARIANTS[variant] else "disk0p2"
    subvols = {f.subvolume: f.locator for f in result.filesystems if f.fstype == "btrfs"}
    snapshots = {"@/.snapshots/1"} if VARIANTS[variant].get("snapshot") else set()
    assert subvols[""] == part and set(subvols) == {"", "@", "@home", "@var", "@/srv/nested", *snapshots}
    assert result.layout == {
        subvols["@"]: "/",
        "disk0p1": "/boot",
        subvols["@home"]: "/home",
        subvols["@var"]: "/var",
        subvols["@/srv/nested"]: "/srv/nested",
        **{subvols[s]: "/.snapshots/1" for s in snapshots},
    }
    assert expected["/usr/bin/ping"].capabilities == "cap_net_admin,cap_net_raw=ep"
    assert f"//{part}/toplevel-tool" in expected
    default = [f.subvolume for f in result.filesystems if f.default_subvolume]
    assert default == (["@"] if VARIANTS[variant].get("set_default") else [""])


def test_btrfs_with_an_fsync_log_written_by_the_kernel_is_refused_by_name(tmp_path: Path) -> None:
    """A guest stopped after an fsync, before the next transaction commit (a crash, `virsh destroy`): the
    kernel wrote the data to its log tree, which it replays on the next mount. The image as it was then."""
    image = _btrfs(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    imgs.run("mount", "-o", "loop,commit=300", image, mnt)
    try:
        imgs.run("btrfs", "filesystem", "sync", mnt)
        with (mnt / "fsynced").open("wb") as fh:
            fh.write(b"#!/bin/sh\necho logged\n")
            os.fchmod(fh.fileno(), 0o755)
            fh.flush()
            os.fsync(fh.fileno())
        crashed = tmp_path / "crashed.raw"
        shutil.copyfile(image, crashed)
    finally:
        imgs.run("umount", mnt)
    with pytest.raises(ImageError, match=r"Btrfs log tree \(fsync log\) present: needs replay on mount"):
        run(crashed)
    assert "/fsynced" in {f.path for f in run(image).files}  # once cleanly unmounted: read, with the file


def _btrfs(tmp_path: Path, *mkfs: str, tree: Path | None = None) -> Path:
    _require_btrfs()
    image = tmp_path / "b.raw"
    with image.open("wb") as fh:
        fh.truncate(200 << 20)
    imgs.run("mkfs.btrfs", "-q", "-f", *mkfs, image)
    if tree is not None:
        imgs.populate_by_mount(tree, image)
    return image


def test_btrfs_with_xxhash_checksums_is_refused_by_name(tmp_path: Path) -> None:
    image = _btrfs(tmp_path, "--csum", "xxhash")
    with pytest.raises(ImageError, match="Btrfs with xxhash64 checksums; use --reader guestfs"):
        run(image)


def test_btrfs_on_two_devices_is_refused_by_name(tmp_path: Path) -> None:
    _require_btrfs()
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    for p in (a, b):
        with p.open("wb") as fh:
            fh.truncate(200 << 20)
    imgs.run("mkfs.btrfs", "-q", "-f", "-d", "single", "-m", "single", a, b)
    with pytest.raises(ImageError, match="Btrfs on 2 devices; use --reader guestfs"):
        run(a)


def _set_super(image: Path, offset: int, fmt: str, value: int) -> None:
    """Write a superblock field and fix the superblock checksum (a well-formed superblock saying it)."""
    with image.open("r+b") as fh:
        fh.seek(0x10000)
        sb = bytearray(fh.read(4096))
        struct.pack_into(fmt, sb, offset, value)
        struct.pack_into("<I", sb, 0, crc32c_raw(0xFFFFFFFF, bytes(sb[32:])) ^ 0xFFFFFFFF)
        fh.seek(0x10000)
        fh.write(sb)


def test_btrfs_with_an_fsync_log_to_replay_is_refused_by_name(tmp_path: Path) -> None:
    """A running (or crashed) guest's fsync log holds what the kernel replays on mount: not read, named."""
    image = _btrfs(tmp_path)
    _set_super(image, 96, "<Q", 0x1D00000)  # log_root
    with pytest.raises(ImageError, match=r"Btrfs log tree \(fsync log\) present: needs replay on mount"):
        run(image)


def test_btrfs_unknown_incompat_feature_is_refused_by_name(tmp_path: Path) -> None:
    image = _btrfs(tmp_path)
    with image.open("rb") as fh:
        fh.seek(0x10000 + 188)
        flags = struct.unpack("<Q", fh.read(8))[0]
    _set_super(image, 188, "<Q", flags | 1 << 13)
    with pytest.raises(ImageError, match="Btrfs incompat feature extent_tree_v2; use --reader guestfs"):
        run(image)


def test_btrfs_corrupt_superblock_is_an_image_error(tmp_path: Path) -> None:
    image = _btrfs(tmp_path)
    with image.open("r+b") as fh:
        fh.seek(0x10000 + 144)
        fh.write(b"\x00\x20\x00\x00")  # sector size changed without fixing the checksum
    with pytest.raises(ImageError, match="corrupt Btrfs filesystem: superblock checksum mismatch"):
        run(image)


def test_btrfs_preallocated_extent_reads_as_zeros(tmp_path: Path) -> None:
    _require_btrfs()
    image = _btrfs(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    imgs.run("mount", "-o", "loop", image, mnt)
    try:
        (mnt / "junk").write_bytes(b"\xaa" * (4 << 20))
        os.sync()
        (mnt / "junk").unlink()
        os.sync()
        imgs.run("fallocate", "-l", str(4 << 20), mnt / "prealloc")
        with (mnt / "prealloc").open("r+b") as fh:
            fh.write(b"#!/bin/sh\n")
        (mnt / "prealloc").chmod(0o755)
        import hashlib

        want = hashlib.sha256((mnt / "prealloc").read_bytes()).hexdigest()
    finally:
        imgs.run("umount", mnt)
    got = {f.path: f for f in run(image).files}
    assert got["/prealloc"].sha256 == want


# --- fuzz -----------------------------------------------------------------------------------------------

FUZZ_LIMITS = Limits(max_file_bytes=64 << 20, max_nodes=10_000, max_extents=10_000)


@pytest.fixture(scope="module", params=["plain", "zstd"])
def small_btrfs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[bytes, list[int], int]:
    """A small Btrfs image (4 KiB nodes, subvolumes, compressed or not), its bytes, the image offsets of the
    superblock and of the tree nodes the reader reads, and the node size."""
    _require_btrfs()
    base = tmp_path_factory.mktemp("bfuzz")
    _small_tree(base / "tree")
    image = base / "small.raw"
    with image.open("wb") as fh:
        fh.truncate(128 << 20)
    imgs.run("mkfs.btrfs", "-q", "-f", "-n", "4096", image)
    mnt = base / "m"
    mnt.mkdir()
    imgs.run("mount", "-o", "loop" + (",compress-force=zstd" if request.param == "zstd" else ""), image, mnt)
    try:
        imgs.run("btrfs", "-q", "subvolume", "create", mnt / "@")
        imgs.run("cp", "-a", "--", f"{base / 'tree'}/.", mnt / "@")
        (mnt / "@/etc").mkdir(exist_ok=True)
        (mnt / "@/etc/fstab").write_text(f"UUID={imgs.btrfs_uuid(image)} / btrfs subvol=@ 0 0\n")
    finally:
        imgs.run("umount", mnt)
    return image.read_bytes(), _live_nodes(image), 4096


def _live_nodes(image: Path) -> list[int]:
    """Image offsets of the tree nodes the reader reads (not the stale copies copy-on-write leaves behind)."""
    seen: set[int] = set()
    real = btrfsfs.BtrfsFilesystem.node

    def spy(fs: btrfsfs.BtrfsFilesystem, address: int, level: int, what: str) -> bytes:
        seen.add(fs.volume.offset + next(fs.map(address, fs.node_size))[0])
        return real(fs, address, level, what)

    setattr(btrfsfs.BtrfsFilesystem, "node", spy)  # noqa: B010 - a spy for the fixture only
    try:
        run(image)
    finally:
        setattr(btrfsfs.BtrfsFilesystem, "node", real)  # noqa: B010
    return [0x10000, *sorted(seen)]  # the superblock (4 KiB, checksummed like a node here) and the nodes


def _mutated_nodes(
    data: bytes, nodes: list[int], size: int, flips: list[tuple[int, int, int]], fix: bool
) -> dict[int, bytes]:
    """The mutated tree nodes by offset (the rest of the image is unchanged)."""
    out: dict[int, bytearray] = {}
    for pick, where, xor in flips:
        node = nodes[pick % len(nodes)]
        block = out.setdefault(node, bytearray(data[node : node + size]))
        block[32 + where % (size - 32)] ^= xor
        if fix:  # a valid checksum over the mutated node: the reader's own checks must hold
            struct.pack_into("<I", block, 0, crc32c_raw(0xFFFFFFFF, bytes(block[32:])) ^ 0xFFFFFFFF)
    return {off: bytes(b) for off, b in out.items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 1 << 16), st.integers(1, 255)), max_size=6),
    fix=st.booleans(),
)
def test_btrfs_corruption_gives_a_result_or_an_image_error(
    small_btrfs: tuple[bytes, list[int], int], tmp_path: Path, flips: list[tuple[int, int, int]], fix: bool
) -> None:
    """Mutated superblock and tree nodes (B-tree headers, keys, inode, directory and extent items), with and
    without a valid checksum: a result or a one-line `ImageError`, never a traceback or a hang."""
    original, nodes, size = small_btrfs
    bad = tmp_path / "bad.raw"
    if not bad.exists():  # one copy per test run; each example changes a few nodes and puts them back
        bad.write_bytes(original)
    blocks = _mutated_nodes(original, nodes, size, flips, fix)
    imgs.write_at(bad, blocks)
    try:
        with open_reader([(bad, "raw")], "fast", limits=FUZZ_LIMITS) as reader:
            result = inventory(reader, workers=2)
    except ImageError as err:
        assert "\n" not in str(err)
        return
    finally:
        imgs.write_at(bad, {off: original[off : off + size] for off in blocks})
    assert list(result.files) == sorted(result.files)


def test_btrfs_fuzz_image_reads_unmutated(small_btrfs: tuple[bytes, list[int], int], tmp_path: Path) -> None:
    original, nodes, _size = small_btrfs
    assert len(nodes) > 5
    good = tmp_path / "good.raw"
    good.write_bytes(original)
    result = run(good)
    assert result.files and all(f.path.startswith("/") and not f.path.startswith("//") for f in result.files)


def test_a_btrfs_overlay_is_read_after_start_through_a_files_only_index(tmp_path: Path) -> None:
    """The post-start (and pre-boot overlay) disk check on Btrfs (issue 19, ADR 0029): Btrfs has no incremental
    index, so the base gets a files-only one: an overlay that changed nothing is the index's files at once, one
    the guest wrote into is read in full, as QEMU presents it, and an executable it added is there."""
    from hostguard.imagefs.chain import LayerRecord
    from hostguard.imagefs.diskindex import build_index
    from hostguard.imagefs.overlayview import effective_files, load_or_build_index, open_bases

    _require_btrfs()
    base, expected = imgs.make_btrfs(tmp_path / "base", compress="zstd")
    untouched = tmp_path / "untouched.qcow2"
    imgs.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, untouched)
    written = imgs.sparse_copy(base, tmp_path / "written.raw")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    imgs.run("mount", "-o", f"loop,offset={imgs.PV_START},subvol=@", written, mnt)
    try:
        (mnt / "usr/bin/implant").write_bytes(b"\x7fELF" + bytes(4096))
        (mnt / "usr/bin/implant").chmod(0o755)
    finally:
        imgs.run("umount", mnt)
    overlay = tmp_path / "written.qcow2"  # only the clusters the kernel changed, over the base
    imgs.run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "raw", written, overlay)
    imgs.run("qemu-img", "check", "-q", overlay)

    def layers(top: Path) -> list[LayerRecord]:
        return [
            LayerRecord(top, "qcow2", top.stat().st_dev, top.stat().st_ino),
            LayerRecord(base, "raw", base.stat().st_dev, base.stat().st_ino),
        ]

    with open_bases([[LayerRecord(base, "raw", base.stat().st_dev, base.stat().st_ino)]]) as reader:
        index = build_index(reader, ["sha256-of-base"])
        assert index.fs == {} and {f.path: f for f in index.files} == expected
        # kept in the state directory like an incremental index, and read back whole
        assert load_or_build_index(tmp_path / "state", lambda: reader, ["sha256-of-base"])[1] is True
        cached, built = load_or_build_index(tmp_path / "state", lambda: reader, ["sha256-of-base"])
        assert not built and cached.files == index.files and cached.fs == {}
        files, stats = effective_files([layers(untouched)], index, lambda: reader)
        assert files == index.files and stats.changed_bytes == 0
        files, stats = effective_files([layers(overlay)], index, lambda: reader)
    assert stats.mode == "full" and stats.changed_bytes > 0, stats
    found = {f.path: f for f in files}
    assert set(found) - set(expected) == {"/usr/bin/implant"} and found["/usr/bin/implant"].mode & 0o777 == 0o755
