"""The incremental inventory of an overlay's view of an XFS base (imagefs.incremental through imagefs.xfsindex)
equals a full inventory of that view, for changes the host kernel makes through a loop mount (cleanly unmounted:
the log holds nothing to replay), written by QEMU into an overlay; and it reads only what changed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.imagefs import ImageSpec
from hostguard.imagefs.chain import open_chain
from hostguard.imagefs.diskindex import DiskIndex, build_index
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.incremental import DeltaStats, effective_inventory
from hostguard.imagefs.inventory import inventory
from hostguard.imagefs.xfsfs import XfsFilesystem
from hostguard.signed.manifest import FileEntry
from tests.testbed.prereq import require
from tests.unit import inventory_images as imgs
from tests.unit.diskcheck_images import layer, overlay_with

SIZE_MB = 128


@dataclass
class XfsBase:
    dir: Path
    raw: Path
    qcow2: Path
    index: DiskIndex
    reader: FastReader
    counter: list[int]

    def changed(self, script: str, *, options: str = "") -> Path:
        """A raw copy of the base changed by a shell `script` run in its loop mount (then unmounted)."""
        self.counter[0] += 1
        dest = self.dir / f"c{self.counter[0]}.raw"
        imgs.sparse_copy(self.raw, dest)
        mounted(dest, script, options=options)
        return dest

    def overlay(self, target: Path) -> Path:
        return overlay_with(self.qcow2, self.raw, target, target.with_suffix(".qcow2"))


def mounted(raw: Path, script: str, *, options: str = "") -> None:
    mnt = raw.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    imgs.run("mount", "-o", f"loop{',' + options if options else ''}", raw, mnt)
    try:
        imgs.run("sh", "-euc", f"cd {mnt}\n{script}")
    finally:
        imgs.run("umount", mnt)
        mnt.rmdir()


@pytest.fixture(scope="module")
def xb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XfsBase]:
    imgs.require_tools()
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs is not installed (xfsprogs)")
    d = tmp_path_factory.mktemp("incr-xfs")
    tree = d / "tree"
    imgs.write_tree(tree, big_mib=1)
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc" / "fstab").write_text("LABEL=root / xfs defaults 0 1\n")
    raw = imgs.make_xfs(tree, d / "base.raw", options=("-L", "root"), size_mb=SIZE_MB)
    qcow2 = imgs.to_qcow2(raw, d / "base.qcow2")
    reader = FastReader([ImageSpec(qcow2, "qcow2")])
    index = build_index(reader, ["base"])
    yield XfsBase(d, raw, qcow2, index, reader, [0])
    reader.close()


def effective(xb: XfsBase, overlay: Path) -> tuple[tuple[FileEntry, ...], DeltaStats]:
    chain = open_chain([layer(overlay, "qcow2"), layer(xb.qcow2, "qcow2")])
    changed = chain.changed()
    with FastReader(disks=[chain], replay_journal=True) as view:
        assert isinstance(view, FastReader)
        return effective_inventory(xb.index, xb.reader, view, [changed])


def full(raw: Path) -> tuple[FileEntry, ...]:
    with FastReader([ImageSpec(raw, "raw")]) as reader:
        return inventory(reader).files


def check(xb: XfsBase, script: str, *, options: str = "") -> DeltaStats:
    target = xb.changed(script, options=options)
    overlay = xb.overlay(target)
    try:
        files, stats = effective(xb, overlay)
        oracle = full(target)
    finally:  # 128 MiB per change: the disk is shared
        target.unlink()
        overlay.unlink()
    assert files == oracle, _diff(files, oracle)
    assert stats.mode == "incremental", stats.reason  # not a fall-back on a full inventory
    return stats


def _diff(a: tuple[FileEntry, ...], b: tuple[FileEntry, ...]) -> str:
    x, y = {f.path: f for f in a}, {f.path: f for f in b}
    return "\n".join(f"{p}: {x.get(p)} != {y.get(p)}" for p in sorted(x.keys() | y.keys()) if x.get(p) != y.get(p))


def test_the_xfs_index_lists_what_the_inventory_lists(xb: XfsBase) -> None:
    assert xb.index.files == full(xb.raw)
    assert [fs.fstype for fs in xb.reader.filesystems()] == ["xfs"]
    (idx,) = xb.index.fs.values()
    fs = xb.reader.indexed_filesystem(xb.reader.filesystems()[0])
    assert isinstance(fs, XfsFilesystem) and idx.root == fs.root_ino
    assert idx.inode_tables == []


def test_a_clean_remount_reads_as_the_cached_list_without_hashing(xb: XfsBase) -> None:
    stats = check(xb, "true")
    assert stats.mode == "incremental" and stats.hashed_files == 0 and stats.dirty_inodes == 0


def test_reading_files_changes_only_access_times(xb: XfsBase) -> None:
    stats = check(xb, "cat bin/busybox usr/bin/big > /dev/null; ls -lR > /dev/null", options="strictatime")
    assert stats.mode == "incremental" and stats.hashed_files == 0 and stats.dirty_inodes == 0


def test_a_new_executable_is_found_and_only_it_is_hashed(xb: XfsBase) -> None:
    stats = check(xb, "cp /usr/bin/true usr/bin/evil; chmod 755 usr/bin/evil")
    assert stats.mode == "incremental" and stats.hashed_files == 1


def test_content_changed_in_place_is_hashed_again(xb: XfsBase) -> None:
    stats = check(xb, "printf 'ELF-tampered' | dd of=bin/busybox bs=1 seek=1 conv=notrunc status=none")
    assert stats.hashed_files == 1


def test_mode_owner_and_capability_changes(xb: XfsBase) -> None:
    stats = check(xb, "chmod 6755 bin/busybox; chown 1000 usr/bin/suid")
    assert stats.hashed_files == 0 and stats.dirty_inodes >= 2
    check(xb, "setcap cap_net_raw+ep usr/bin/empty-script; setcap -r usr/bin/ping")
    check(xb, "printf '\\177ELF' | dd of=usr/share/data.txt conv=notrunc status=none")


def test_removals_renames_and_links(xb: XfsBase) -> None:
    check(xb, "rm usr/bin/suid; rm -r many")
    stats = check(xb, "mv usr/lib opt/lib2")
    assert stats.hashed_files == 0  # a moved directory's files keep their digests
    check(xb, "ln usr/share/data.txt usr/share/data.ko; rm bin/busybox; ln usr/bin/suid bin/busybox")
    check(xb, "rm usr/bin/empty-script; mkdir usr/bin/empty-script; cp /usr/bin/true usr/bin/empty-script/x")


def test_directories_grow_to_block_leaf_and_node_form(xb: XfsBase) -> None:
    # 3000 entries: a short-form directory becomes block, leaf and node form (several directory blocks).
    stats = check(xb, "mkdir -p opt/wide; for i in $(seq 3000); do : > opt/wide/f$i; done; "
                      "cp /usr/bin/true opt/wide/f1777; chmod 755 opt/wide/f1777; "
                      "for i in $(seq 300); do : > many/x$i; done")  # fmt: skip
    assert stats.hashed_files == 1


def test_a_file_with_an_extent_btree(xb: XfsBase) -> None:
    # Many separate extents (written every other block) do not fit in the inode: the data fork is a B+tree.
    script = (
        "cp /usr/bin/true usr/bin/frag; i=0; while [ $i -lt 400 ]; do "
        "dd if=/dev/urandom of=usr/bin/frag bs=4096 count=1 seek=$((i*2+8)) conv=notrunc status=none; "
        "i=$((i+1)); done; chmod 755 usr/bin/frag"
    )
    check(xb, script)
    # Then one block of it changes in place: the B+tree is a dependency, the content is hashed again.
    base_then = xb.changed(script)
    target = base_then.with_name("frag2.raw")
    imgs.sparse_copy(base_then, target)
    mounted(target, "dd if=/dev/zero of=usr/bin/frag bs=4096 count=1 seek=100 conv=notrunc status=none")
    files, _ = effective(xb, overlay_with(xb.qcow2, xb.raw, target, target.with_suffix(".qcow2")))
    assert files == full(target)


def test_fallocate_unwritten_extents_are_zeros(xb: XfsBase) -> None:
    check(xb, "fallocate -l 1M usr/bin/pre; chmod 755 usr/bin/pre; "
              "printf '\\177ELF' | dd of=usr/bin/pre conv=notrunc status=none")  # fmt: skip


ATOMS = [
    "cp /usr/bin/true usr/bin/evil; chmod 755 usr/bin/evil",
    "chmod 6755 bin/busybox",
    "rm usr/bin/suid",
    "chmod 644 usr/bin/sgid-noexec",
    "mv usr/lib opt/lib2",
    "rm many/prog-0007 many/prog-0150",
    "mkdir opt/x; cp /usr/bin/true opt/x/tool; chmod 700 opt/x/tool",
    "ln usr/share/data.txt lib/modules/6.1.0/kernel/data.ko",
    "setcap cap_net_raw+ep usr/share/empty",
    "setcap -r usr/bin/ping",
    "chown 0 home/user/tool",
    "rm boot/vmlinuz-6.1.0; ln usr/bin/big boot/vmlinuz-6.1.0",
    "printf 'ELF changed' | dd of=usr/bin/big bs=1 seek=4 conv=notrunc status=none",
]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.sets(st.integers(0, len(ATOMS) - 1), min_size=1, max_size=5))
def test_any_combination_of_changes(xb: XfsBase, chosen: set[int]) -> None:
    check(xb, "\n".join(ATOMS[i] for i in sorted(chosen)))


# --- XFS on LVM2 (a RHEL-style disk: the root LV in two segments) --------------------------------------------


def test_xfs_root_on_lvm_in_two_segments(tmp_path: Path) -> None:
    import os

    d = tmp_path / "rhel"
    d.mkdir()
    vg = f"hgx{os.getpid()}"
    image, _ = imgs.make_rhel_like(d, vg)
    qcow2 = imgs.to_qcow2(image, d / "disk.qcow2")
    with FastReader([ImageSpec(qcow2, "qcow2")]) as reader:
        assert isinstance(reader, FastReader)
        index = build_index(reader, ["base"])
        info = next(f for f in reader.filesystems() if f.locator == f"lvm:{vg}:root")
        runs = reader.indexed_filesystem(info).volume.image_runs()
        assert len(runs) == 2
        # New directories land in every allocation group, so in both segments of the LV.
        root = d / "root.xfs"
        mounted(root, "for i in 1 2 3 4 5 6 7 8; do mkdir -p opt/d$i/sub; cp /usr/bin/true opt/d$i/sub/x; done; "
                      "chmod 4755 usr/bin/big; rm many/prog-0001")  # fmt: skip
        target = d / "target.raw"
        imgs.sparse_copy(image, target)
        imgs.overwrite_lv(target, runs, root)
        overlay = overlay_with(qcow2, image, target, d / "top.qcow2")
        chain = open_chain([layer(overlay, "qcow2"), layer(qcow2, "qcow2")])
        changed = chain.changed()
        second = runs[1][1]
        assert any(off + n > second for off, n in changed), "no change in the second segment"
        with FastReader(disks=[chain]) as view:
            assert isinstance(view, FastReader)
            files, stats = effective_inventory(index, reader, view, [changed])
    with FastReader([ImageSpec(target, "raw")]) as oracle_reader:
        oracle = inventory(oracle_reader).files
    assert files == oracle, _diff(files, oracle)
    assert stats.mode == "incremental", stats.reason
    assert {f"/opt/d{i}/sub/x" for i in range(1, 9)} <= {f.path for f in files}
