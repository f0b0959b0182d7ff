"""The XFS log as the host kernel writes it (loop mounts, `xfs_io shutdown` as a crash): the fast reader reads a
filesystem only when the kernel's recovery would not change what it reads, and then reads exactly what the
kernel shows after recovery (a mount + unmount of a copy); otherwise it refuses, naming "xfs log not clean".
Hostile logs give an ImageError, never a traceback or a hang."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs import DEFAULT_LIMITS, ImageSpec, UnsupportedLayout
from hostguard.imagefs.crc32c import crc32c_raw
from hostguard.imagefs.disk import RawImage
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.inventory import inventory
from hostguard.imagefs.partitions import Volume
from hostguard.imagefs.xfsfs import XfsFilesystem
from hostguard.imagefs.xfslog import LogState
from hostguard.signed.manifest import FileEntry
from tests.testbed.prereq import require
from tests.unit import inventory_images as imgs

SIZE_MB = 320
WRITES = "mkdir -p opt/new; cp /usr/bin/true opt/new/tool; chmod 4755 opt/new/tool; rm usr/bin/suid; mv many opt/"


def crashed(base: Path, out: Path, script: str, *, before_crash: str = "", mount: str = "", flush: bool = True) -> Path:
    """A copy of `base` mounted by the host kernel, changed by `script`, then shut down as a crash would, after
    `before_crash` xfs_io commands. `flush`: the log is written first (a crash after the log write, before the
    metadata is written in place); otherwise what was not yet in the log is lost, as in a crash."""
    imgs.sparse_copy(base, out)
    mnt = out.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    imgs.run("mount", "-o", f"loop{',' + mount if mount else ''}", out, mnt)
    try:
        imgs.run("sh", "-euc", f"cd {mnt}\n{script}")
        commands = [c for cmd in before_crash.split(";") if cmd.strip() for c in ("-c", cmd.strip())]
        commands += ["-c", "shutdown -f" if flush else "shutdown"]
        imgs.run("xfs_io", "-x", *commands, mnt)
    finally:
        imgs.run("umount", mnt)
        mnt.rmdir()
    return out


def recovered(image: Path) -> Path:
    """A copy of `image` after the host kernel's log recovery (mount, unmount)."""
    out = image.with_name(image.stem + "-recovered.raw")
    imgs.sparse_copy(image, out)
    mnt = out.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    imgs.run("mount", "-o", "loop", out, mnt)
    imgs.run("umount", mnt)
    mnt.rmdir()
    return out


def files(image: Path) -> tuple[FileEntry, ...]:
    with FastReader([ImageSpec(image, "raw")]) as reader:
        return inventory(reader).files


def state(image: Path) -> LogState:
    disk = RawImage(ImageSpec(image, "raw"), 0)
    try:
        return XfsFilesystem(Volume(disk, 0, disk.size), DEFAULT_LIMITS).log
    finally:
        disk.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    imgs.require_tools()
    require(shutil.which("mkfs.xfs") is not None and shutil.which("xfs_io") is not None, "xfsprogs is not installed")
    d = tmp_path_factory.mktemp("xlog")
    tree = d / "tree"
    imgs.write_tree(tree, big_mib=1)
    return imgs.make_xfs(tree, d / "base.raw", size_mb=SIZE_MB)


def test_a_cleanly_unmounted_log_is_clean(base: Path) -> None:
    st_ = state(base)
    assert st_.clean and st_.tail == st_.head and not st_.changes


def test_attack_a_change_only_in_the_log_is_refused_not_missed(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the log write: the new setuid file exists only in the log. Read in place, it is missed; the
    kernel's recovery brings it back. The reader refuses, naming the log."""
    image = crashed(base, tmp_path / "crash.raw", WRITES)
    assert "/opt/new/tool" in {f.path for f in files(recovered(image))}
    with pytest.raises(UnsupportedLayout, match="xfs log not clean: recovery would replay"):
        files(image)
    with monkeypatch.context() as m:  # what reading in place (ADR 0017's reader) would have shown
        m.setattr("hostguard.imagefs.xfsfs.check_log", lambda fs: LogState())
        assert "/opt/new/tool" not in {f.path for f in files(image)}


def test_a_crash_that_lost_the_unwritten_log_reads_as_recovered_or_is_refused(base: Path, tmp_path: Path) -> None:
    image = crashed(base, tmp_path / "lost.raw", WRITES, flush=False)
    try:
        got = files(image)
    except UnsupportedLayout as err:
        assert "xfs log not clean" in err.message
    else:
        assert got == files(recovered(image))


def test_a_quiesced_log_reads_as_the_kernel_recovers_it(base: Path, tmp_path: Path) -> None:
    """An idle guest's log is covered (metadata written in place, only superblock records after the tail): the
    dirty log replays nothing, and the reader shows exactly the recovered filesystem."""
    image = crashed(base, tmp_path / "quiet.raw", WRITES, before_crash="freeze;thaw")
    st_ = state(image)
    assert not st_.clean and st_.tail != st_.head and st_.items > 0 and st_.skipped == st_.items and not st_.changes
    got = files(image)
    assert got == files(recovered(image))
    assert "/opt/new/tool" in {f.path for f in got}


def test_a_wrapped_log_with_large_records(tmp_path: Path) -> None:
    """Many transactions wrap a small log several times, in 256 KiB log buffers (eight header blocks per record):
    the head is found past the wraps, a quiesced log reads as recovered, a busy one is refused."""
    tree = tmp_path / "tree"
    imgs.write_tree(tree, big_mib=1)
    small = imgs.make_xfs(tree, tmp_path / "small-log.raw", options=("-l", "size=1368b"), size_mb=200)
    script = "mkdir -p opt/w; for r in 1 2 3 4; do for i in $(seq 8000); do : > opt/w/f$i; done; rm -f opt/w/f*; done; "
    script += WRITES
    image = crashed(small, tmp_path / "wrap.raw", script, before_crash="freeze;thaw", mount="logbsize=256k")
    st_ = state(image)
    assert st_.cycle > 2 and not st_.changes, st_
    assert files(image) == files(recovered(image))
    busy = crashed(small, tmp_path / "wrap-busy.raw", script, mount="logbsize=256k")
    with pytest.raises(UnsupportedLayout, match="xfs log not clean"):
        files(busy)


def test_reading_files_after_quiesce_changes_only_access_times(base: Path, tmp_path: Path) -> None:
    image = crashed(base, tmp_path / "atime.raw", "cat bin/busybox usr/bin/big > /dev/null", mount="strictatime")
    try:
        got = files(image)
    except UnsupportedLayout as err:
        assert "xfs log not clean" in err.message  # atime updates are logged inode changes: refused is fine
    else:
        assert got == files(recovered(image))


# --- hostile logs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A small crashed image whose log holds several records to replay; (image, volume offset of its first
    record, bytes from there to the head)."""
    imgs.require_tools()
    d = tmp_path_factory.mktemp("xlog-fuzz")
    imgs.write_tree(d / "tree", big_mib=1)
    small = imgs.make_xfs(d / "tree", d / "small.raw", size_mb=64)
    many = WRITES + "; for i in $(seq 300); do : > opt/f$i; done; chmod 700 bin/busybox"
    image = crashed(small, d / "dirty.raw", many)
    head = image.read_bytes()[:512]
    bs, logstart = struct.unpack_from(">I", head, 4)[0], struct.unpack_from(">Q", head, 48)[0]
    agblklog, agblocks = head[124], struct.unpack_from(">I", head, 84)[0]
    block = (logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))
    with pytest.raises(UnsupportedLayout):
        state(image)
    out = subprocess.run(["xfs_logprint", "-t", str(image)], capture_output=True, text=True, check=True).stdout
    words = out.split("log tail:")[1].split()
    t, h = int(words[0]), int(words[2])  # "log tail: T head: H state: <DIRTY>" (xfsprogs' own reading)
    assert h > t, out[:300]
    return image, block * bs + t * 512, (h - t) * 512


def _recrc(data: bytearray, log_at: int, span: int) -> None:
    """Give every record header in the log's first `span` bytes a valid CRC again (so the fuzz reaches the
    parsing behind the CRC check)."""
    for at in range(log_at, log_at + span, 512):
        if data[at : at + 4] != b"\xfe\xed\xba\xbe":
            continue
        h_len = min(struct.unpack_from(">I", data, at + 12)[0], 256 * 1024)
        body = bytes(data[at + 512 : at + 512 + h_len])
        crc = crc32c_raw(0xFFFFFFFF, bytes(data[at : at + 32]) + bytes(4) + bytes(data[at + 36 : at + 328]) + body)
        struct.pack_into("<I", data, at + 32, crc ^ 0xFFFFFFFF)


@pytest.fixture(scope="module")
def fuzzed_copy(dirty: tuple[Path, int, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the dirty image, made once: each example writes its fuzzed log bytes into it and puts the
    original bytes back (the file the reader opens is the same as a fuzzed copy of the whole image)."""
    out = tmp_path_factory.mktemp("xlog-fuzzed") / "fuzzed-log.raw"
    imgs.sparse_copy(dirty[0], out)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)), min_size=1,
                      max_size=6), fix_crc=st.booleans())  # fmt: skip
def test_hostile_log_bytes_give_a_result_or_an_image_error(
    dirty: tuple[Path, int, int], fuzzed_copy: Path, edits: list[tuple[int, bytes]], fix_crc: bool
) -> None:  # fmt: skip
    image, records_at, span = dirty
    size = image.stat().st_size
    # Everything an edit or `_recrc` can touch: the records, a last blob, a record's header and body after it.
    with image.open("rb") as fh:
        fh.seek(records_at)
        original = fh.read(span + 8 + 512 + 256 * 1024)
    data = bytearray(original)
    for off, blob in edits:  # inside the records between tail and head: headers, operations, items
        at = off % span
        data[at : at + len(blob)] = blob
    if fix_crc:
        _recrc(data, 0, span)
    with fuzzed_copy.open("r+b") as fh:
        fh.seek(records_at)
        fh.write(data)
    try:
        files(fuzzed_copy)
    except ImageError as err:
        assert "\n" not in err.message
    finally:
        with fuzzed_copy.open("r+b") as fh:
            fh.seek(records_at)
            fh.write(original)
            fh.truncate(size)


def test_attack_a_dirty_log_in_an_overlay_is_not_taken_for_the_clean_base_log(base: Path, tmp_path: Path) -> None:
    """Clean logs are remembered by where their bytes come from: an overlay that holds a (crashed) log over a
    base whose clean log was read before must be assessed again, and refused."""
    from hostguard.imagefs.chain import open_chain
    from tests.unit.diskcheck_images import layer, overlay_with

    base_qcow2 = imgs.to_qcow2(base, tmp_path / "base.qcow2")
    empty = overlay_with(base_qcow2, base, base, tmp_path / "empty.qcow2")
    for top in (empty, empty):  # the second open takes the remembered state
        with FastReader(disks=[open_chain([layer(top, "qcow2"), layer(base_qcow2, "qcow2")])]) as view:
            assert isinstance(view, FastReader)
            fs = view.indexed_filesystem(view.filesystems()[0])
            assert isinstance(fs, XfsFilesystem) and fs.log.clean
    image = crashed(base, tmp_path / "crash.raw", WRITES)
    top = overlay_with(base_qcow2, base, image, tmp_path / "crash.qcow2")
    with pytest.raises(UnsupportedLayout, match="xfs log not clean"):
        FastReader(disks=[open_chain([layer(top, "qcow2"), layer(base_qcow2, "qcow2")])])
