"""A hostile guest under checks (issue 20, item 8): an ext4 journal of the largest size its file system can take,
full of committed transactions the kernel has not checkpointed. Both checks that read a running guest's disk (the
hook's overlay check before boot, the daemon's disk stage) replay that journal in memory: each must end in a
verdict, bounded in time and memory, and judge the replayed view. docs/reliability.md lists what was observed.

The guest's disk is made on the host, as the guest's own kernel would leave it at a crash:

1. the signed base's raw twin (64 MiB, 4 KiB blocks, metadata_csum: the kernel writes journal_checksum_v3) is
   grown to GROWN_MIB and its file system with it (`resize2fs`, as a guest can do online on a bigger overlay);
2. its 4 MiB journal is replaced by the largest e2fsprogs makes: tune2fs (and mke2fs) refuse a journal of more
   than half the free blocks (or 10,240,000 blocks: 80 GiB file systems and up), so the size is computed from
   `dumpe2fs -h` and tune2fs must refuse one MiB more;
3. the host's kernel writes it through a loop mount with `data=journal` (file data goes through the journal too)
   and `commit=300,noatime` (nothing commits but an fsync, one per file: a transaction each; not `sync -f`, see
   `write_fsynced`): plain files of which every block starts with the jbd2 magic (the kernel escapes such blocks
   in the log), more than the journal holds, so the log wraps and the kernel checkpoints only what it must;
4. with nothing writing, the mounted file system's backing file is copied: the crash image (`needs_recovery`,
   the log nearly full, checked with `dumpe2fs -h` and `debugfs -R logdump`); a second crash image adds, in the
   newest transaction, unsigned executables that exist only in the journal (debugfs, which does not replay, must
   not find them);
5. each crash image becomes a qcow2 overlay on the signed base (`qemu-img convert -B`), its domain is started
   paused (the hook checks the overlay before boot) and judged by a real daemon.

Unexpected executables are logged, not acted on, by this test's policy, so that the hook lets the second domain
start and the daemon judges it too."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.imagefs import DEFAULT_LIMITS, ImageSpec, Limits, UnsupportedLayout
from hostguard.imagefs.disk import open_disk
from hostguard.imagefs.extfs import ExtFilesystem
from hostguard.imagefs.journal import JBD2_MAGIC, _Header, _Journal, _scan
from hostguard.imagefs.partitions import volumes
from tests.faults.test_faults import start_paused
from tests.integration.test_daemon import DaemonProcess, config_with, wait_verdict
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require_module, require_tool

libvirt = require_module("libvirt")
GROWN_MIB = 1024  # the overlay's virtual size: a journal of ~494 MiB (126,464 blocks), replayed in seconds
E2FSPROGS_MAX_JOURNAL_BLOCKS = 10_240_000
FILE_MIB = 4  # one file, one transaction (fsynced)
KEEP_FILES = 32  # files kept: 128 MiB
OVERFILL = 0.75  # plain data written before the first crash image, in journals: the kernel checkpoints (wrap)
TOP_UP = 0.3  # and before the second one
FULL_ENOUGH = 0.55  # of the journal, covered by the committed log (the kernel's most: ~2/3, see `fill_log`)
EXECUTABLES = ("/hostile/bin/evil-0", "/hostile/bin/evil-1", "/hostile/bin/evil-2")
MEMORY_BOUND_KIB = 512 * 1024
CHECK_BOUND_MS = 300_000


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


def superblock(image: Path) -> dict[str, str]:
    out = run("dumpe2fs", "-h", image).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


@contextlib.contextmanager
def loop_mounted(raw: Path, where: Path, options: str) -> Iterator[Path]:
    """`raw` loop-mounted at `where`; unmounted (lazily if busy) and its loop device gone afterwards."""
    where.mkdir()
    try:
        run("mount", "-t", "ext4", "-o", f"loop,{options}", raw, where)
        try:
            yield where
        finally:
            if run("umount", where, check=False).returncode != 0:
                run("umount", "-l", where, check=False)
    finally:
        for line in run("losetup", "-j", raw, check=False).stdout.splitlines():  # autoclear missed (lazy umount)
            run("losetup", "-d", line.split(":", 1)[0], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


@contextlib.contextmanager
def hook_logs_unexpected_executables(host: GuardedHost) -> Iterator[None]:
    """The hook (which reads its config at each start) and daemons configured meanwhile log unexpected executables."""
    original = host.config.read_text()
    host.config.write_text(original + '\n[findings.action]\n"unexpected-executable" = "log"\n')
    try:
        yield
    finally:
        host.config.write_text(original)


def largest_journal(raw: Path) -> int:
    """Replace the journal by the largest one tune2fs makes; returns its size in blocks."""
    run("tune2fs", "-O", "^has_journal", raw)
    sb = superblock(raw)
    assert sb["Block size"] == "4096", sb
    blocks = min(int(sb["Free blocks"]) // 2, E2FSPROGS_MAX_JOURNAL_BLOCKS)
    mib = blocks // 256
    refused = run("tune2fs", "-J", f"size={mib + 1}", raw, check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and ("too big" in said or str(E2FSPROGS_MAX_JOURNAL_BLOCKS) in said), said
    run("tune2fs", "-J", f"size={mib}", raw)
    return mib * 256


def write_fsynced(path: Path, content: bytes, mode: int = 0o644) -> None:
    """As an application that wants its data safe: fsync commits the running transaction (ext4_fsync_journal), and
    nothing more. `sync -f` would not do: syncfs also flushes the block device, writing every committed block home,
    and the crash image would then not need its journal to show what was written."""
    with path.open("wb") as fh:
        fh.write(content)
        fh.flush()
        os.fchmod(fh.fileno(), mode)
        os.fsync(fh.fileno())


def write_plain(root: Path, first: int, total_bytes: int) -> int:
    """Files of FILE_MIB MiB under root/data, each block starting with the jbd2 magic (escaped in the log), each
    fsynced (a transaction each), the file KEEP_FILES before each removed (the journal takes half the space; the
    kernel revokes the journalled blocks it frees); returns the next file number."""
    (root / "data").mkdir(exist_ok=True)
    n = first
    for _ in range(-(-total_bytes // (FILE_MIB << 20))):
        (root / "data" / f"f{n - KEEP_FILES}").unlink(missing_ok=True)
        write_fsynced(root / "data" / f"f{n}", file_content(n))
        n += 1
    return n


def file_content(n: int) -> bytes:
    magic = struct.pack(">I", JBD2_MAGIC)
    return b"".join(magic + struct.pack(">II", n, b) + bytes(4084) for b in range(FILE_MIB << 8))


def logdump(image: Path) -> tuple[int, int, int]:
    """(journal block where the committed log starts, where it ends, transactions), from `debugfs -R logdump`
    (e2fsprogs' own journal reader; -c: the bitmaps of a crashed file system do not match their checksums)."""
    out = run("debugfs", "-c", "-R", "logdump", image).stdout
    start = re.search(r"Journal starts at block (\d+), transaction (\d+)", out)
    end = re.search(r"at block (\d+): end of journal", out)
    assert start and end, out[-2000:]
    commits = len(re.findall(r"type 2 \(commit block\)", out))
    return int(start.group(1)), int(end.group(1)), commits


def log_fill(image: Path, journal_blocks: int) -> tuple[float, bool]:
    """The share of the journal that its committed log covers (block 0 is the journal's superblock), and whether
    the log wraps (goes on at the journal's start)."""
    start, end, _commits = logdump(image)
    return ((end - start) % (journal_blocks - 1)) / (journal_blocks - 1), end < start


def fill_log(root: Path, raw: Path, n: int, journal_blocks: int, at_least: float, *, wrap: bool) -> int:
    """Plain files (`at_least` journals of them first) until the committed log covers FULL_ENOUGH of the journal
    (and, with `wrap`, goes on at the journal's start); returns the next file number.

    The kernel never fills it: before a transaction starts it checkpoints (moves the log's start on) when less
    than a quarter of the journal plus the credits in flight is free. Measured here (6.18, 4 MiB transactions,
    nothing else writing): the log grows to 60-66 % of the journal, then drops to 26-35 %; one last big
    transaction (64-120 MiB) drops it at once. Written back by the flusher (blocks dirty for 30 s, or too much
    dirty memory on the host), blocks leave the log sooner: hence a quick build."""
    n = write_plain(root, n, int(at_least * journal_blocks * 4096))
    seen = []
    for _ in range(3 * journal_blocks // (FILE_MIB << 8)):  # three more journals at most
        fill, wraps = log_fill(raw, journal_blocks)
        seen.append(f"{fill:.2f}{'w' if wraps else ''}")
        if fill >= FULL_ENOUGH and (wraps or not wrap):
            return n
        n = write_plain(root, n, FILE_MIB << 20)
    raise AssertionError(f"the log never covered {FULL_ENOUGH:.0%} of the journal{' and wrapped' * wrap}: {seen}")


def replay_figures(image: Path) -> tuple[ExtFilesystem, dict[str, Any]]:
    """hostguard's replay of the crash image, measured in this process: (replayed view, figures)."""
    volume = volumes(open_disk(ImageSpec(image, "raw"), 0))[0]
    t = time.monotonic()
    fs = ExtFilesystem(volume, DEFAULT_LIMITS, replay_journal=True)
    seconds = time.monotonic() - t
    tracemalloc.start()
    try:
        ExtFilesystem(volume, DEFAULT_LIMITS, replay_journal=True)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    j = _Journal(fs)
    h = _Header(j)
    committed, _after = _scan(j, h)
    tags = sum(len(t.tags) for t in committed)
    return fs, {
        "seconds": seconds,
        "transactions": len(committed),
        "data_blocks": tags,
        "replayed_blocks": len(fs.remap),
        "maxlen": h.maxlen,
        "first": h.first,
        "start": h.start,
        "wraps": any(jpos < h.start for t in committed for _target, jpos, _f, _c in t.tags),
        "us_per_block": seconds / max(tags, 1) * 1e6,
        "heap_bytes_per_block": peak / max(tags, 1),
    }


def read_replayed(fs: ExtFilesystem, path: bytes) -> bytes:
    for node, inode in fs.walk([0]):
        if node.path == path:
            return b"".join(bytes(piece) for piece in fs.read_chunks(inode, path))
    raise AssertionError(f"{path!r} is not in the replayed view")


def crash_images(raw: Path, journal_blocks: int) -> tuple[Path, Path, int, int]:
    """The two crash images beside `raw` (plain data; plain data then executables) and the last plain file of each."""
    plain, hostile = raw.with_name("plain.crashed.raw"), raw.with_name("hostile.crashed.raw")
    with loop_mounted(raw, raw.with_name("mnt"), "data=journal,commit=300,noatime") as root:
        n = fill_log(root, raw, 0, journal_blocks, OVERFILL, wrap=False)
        run("cp", "--sparse=always", raw, plain)  # nothing writes: a crash image of a full log
        last_plain = n - 1
        n = fill_log(root, raw, n, journal_blocks, TOP_UP, wrap=True)
        (root / "hostile" / "bin").mkdir(parents=True)
        for i, path in enumerate(EXECUTABLES):
            write_fsynced(root / path.lstrip("/"), b"#!/bin/sh\necho not signed %d\n" % i, 0o755)
        # The newest transaction, committed seconds ago: not checkpointed, not yet written back (30 s).
        run("cp", "--sparse=always", raw, hostile)
    return plain, hostile, last_plain, n - 1


def overlay_of(crashed: Path, base: Path, overlay: Path) -> Path:
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "qcow2", crashed, overlay)
    overlay.chmod(0o644)
    return overlay


def hook_record(host: GuardedHost, name: str) -> dict[str, Any]:
    for line in reversed(host.audit_log.read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("domain") == name and rec.get("operation") == "prepare":
            return rec  # type: ignore[no-any-return]
    raise AssertionError(f"no audit line for {name}")


def disk_stage_stats(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    """The daemon's own figures for its last disk stage of `name` (its log line "disk content: {...}")."""
    marker = f"{name}: disk content: "
    found = [line for line in daemon.log.read_text().splitlines() if marker in line]
    assert found, f"no disk-content line for {name} in {daemon.log}"
    sets = json.loads(found[-1].split(marker, 1)[1])["sets"]
    return sets[0] if sets else {}


def hostile_overlays(guest: Guest, base: Path, env: LibvirtEnv, report: list[str]) -> dict[str, Path]:
    """The two overlays ("plain", "hostile") on the signed base, each checked as a crash image first."""
    t0 = time.monotonic()
    # The guest's disk on tmpfs while the host's kernel writes it: no dirty page of the backing file adds to the
    # host's dirty memory, whose writeback would checkpoint the log early (see `fill_log`).
    shm = Path(tempfile.mkdtemp(prefix=f"hgt-journal-{os.getpid()}-", dir="/dev/shm"))
    try:
        raw = shm / "grown.raw"
        run("cp", "--sparse=always", guest.root_raw, raw)
        run("truncate", "-s", f"{GROWN_MIB}M", raw)
        run("e2fsck", "-f", "-p", raw)
        run("resize2fs", raw)
        journal_blocks = largest_journal(raw)
        sb = superblock(raw)
        report.append(
            f"file system {int(sb['Block count'])} blocks of 4 KiB; largest journal tune2fs makes: {journal_blocks}"
            f" blocks ({journal_blocks >> 8} MiB; {journal_blocks >> 8} + 1 MiB refused: 'too big')"
        )
        plain, hostile, *last_files = crash_images(raw, journal_blocks)
        raw.unlink()
        built = time.monotonic() - t0
        figures: dict[str, dict[str, Any]] = {}
        for (name, image), last_file in zip((("plain", plain), ("hostile", hostile)), last_files, strict=True):
            figures[name] = check_crash_image(name, image, last_file, report)
        assert figures["hostile"]["wraps"], figures["hostile"]  # the replay follows the log round the journal's end
        overlays = {
            name: overlay_of(image, base, env.path(f"{name}.qcow2"))
            for name, image in (("plain", plain), ("hostile", hostile))
        }
    finally:
        shutil.rmtree(shm)
    report.append(
        f"built in {built:.0f} s; overlays "
        + ", ".join(f"{k} {v.stat().st_size >> 20} MiB" for k, v in overlays.items())
    )
    return overlays


def check_crash_image(name: str, image: Path, last_file: int, report: list[str]) -> dict[str, Any]:
    """What the kernel left, read by e2fsprogs and replayed by hostguard; the figures of the replay."""
    sb = superblock(image)
    assert "needs_recovery" in sb["Filesystem features"], f"{name}: the crash image needs no recovery"
    assert "journal_checksum_v3" in sb["Journal features"], sb["Journal features"]
    start, end, commits = logdump(image)
    fs, fig = replay_figures(image)
    assert (fig["start"], fig["transactions"]) == (start, commits), (fig, start, end, commits)
    usable = fig["maxlen"] - fig["first"]
    fig["fill"] = ((end - start) % usable) / usable
    report.append(
        f"{name}: log journal blocks {start} -> {end} of [{fig['first']}, {fig['maxlen']}) "
        f"({fig['fill']:.0%} full{', wraps' if fig['wraps'] else ''}), {commits} transactions, "
        f"{fig['data_blocks']} data blocks ({fig['replayed_blocks']} distinct fs blocks) replayed in "
        f"{fig['seconds']:.1f} s in this process ({fig['us_per_block']:.0f} us and "
        f"{fig['heap_bytes_per_block']:.0f} B of peak Python heap per data block)"
    )
    assert fig["fill"] >= FULL_ENOUGH, report[-1]
    # A longer log than the replay's bound is refused by name, not replayed (a guest picks its journal's size).
    bound = Limits(max_journal_blocks=fig["data_blocks"] // 2)
    with pytest.raises(UnsupportedLayout, match="max_journal_blocks"):
        ExtFilesystem(volumes(open_disk(ImageSpec(image, "raw"), 0))[0], bound, replay_journal=True)
    # The replayed view is the kernel's: the last file (all in the journal) reads back as written, every block
    # starting with the jbd2 magic (escaped in the log, restored by the replay).
    assert read_replayed(fs, b"/data/f%d" % last_file) == file_content(last_file), name
    if name == "hostile":
        # The executables exist only in the journal: e2fsprogs' reader, which does not replay, sees none.
        unreplayed = run("debugfs", "-c", "-R", f"stat {EXECUTABLES[0]}", image, check=False)
        assert "not found" in unreplayed.stdout + unreplayed.stderr, unreplayed
        assert read_replayed(fs, EXECUTABLES[0].encode()).startswith(b"#!/bin/sh")
    return fig


def test_a_guest_that_fills_a_maximal_ext4_journal_gets_bounded_checks_that_judge_the_replayed_view(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    for tool in ("tune2fs", "resize2fs", "e2fsck", "dumpe2fs", "debugfs", "losetup", "qemu-img"):
        require_tool(tool)
    report: list[str] = []
    overlays = hostile_overlays(busybox_guest, signed_base, libvirt_env, report)

    with hook_logs_unexpected_executables(host):
        config = config_with(host, "hostile-journal", "memory_check = false\ncheck_interval_seconds = 3600")
        daemon = DaemonProcess(host, config)
        daemon.start()
        try:
            for name, overlay in overlays.items():
                dom = libvirt_env.define_guest(f"journal-{name}", busybox_guest, disk_path=overlay)
                t = time.time()
                refused = start_paused(dom)
                hook = hook_record(host, dom.name())
                assert refused is None, f"{name}: the hook refused the start: {refused}"
                verdict = wait_verdict(host, dom, t, timeout=600)
                stage = disk_stage_stats(daemon, dom.name())
                report.append(
                    f"{name}: hook {hook['verdict']} in {hook['duration_ms'] / 1000:.1f} s "
                    f"({'; '.join(hook.get('notes', []))[:200]}); daemon {verdict['status']} ({verdict['action']}) "
                    f"in {verdict['duration_ms'] / 1000:.1f} s, disk stage "
                    f"{verdict['stages_ms'].get('disk-content', 0.0) / 1000:.1f} s ({stage.get('mode')}"
                    f"{': ' + stage['reason'] if stage.get('reason') else ''}; {stage.get('replayed_blocks')} blocks "
                    f"replayed), reason: {verdict['reason'][:200]}; "
                    f"daemon peak RSS {daemon.peak_rss_kib() >> 10} MiB"
                )
                assert hook["duration_ms"] < CHECK_BOUND_MS and verdict["duration_ms"] < CHECK_BOUND_MS, report[-1]
                assert stage.get("replayed_blocks", 0) > 0, stage  # the daemon read the replayed view
                found = sorted(f["path"] for f in verdict["findings"] if f["kind"] == "unexpected-executable")
                if name == "plain":
                    assert verdict["status"] == "pass", verdict
                    assert "overlay content checked before boot" in " ".join(hook["notes"]), hook
                else:
                    assert verdict["status"] == "fail" and verdict["action"] == "log", verdict
                    assert found == list(EXECUTABLES), verdict
                    assert [f["kind"] for f in verdict["findings"]] == ["unexpected-executable"] * 3, verdict
                    assert all(path in " ".join(hook["notes"]) for path in EXECUTABLES[:1]), hook
                dom.destroy()
            peak = daemon.peak_rss_kib()
        finally:
            daemon.kill()
    print("\n".join(report))
    assert peak <= MEMORY_BOUND_KIB, f"daemon peak RSS {peak >> 10} MiB > {MEMORY_BOUND_KIB >> 10} MiB"
