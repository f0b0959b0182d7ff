"""The pure memory comparison: fake task lists, module lists and ELF pages against a manifest."""

from __future__ import annotations

from hostguard.memory.judge import (
    ELF_SCAN_PATH,
    MEMORY_PATH,
    DiskFile,
    DiskReference,
    compare_memory,
    manifest_module_names,
)
from hostguard.memory.model import (
    EXITING,
    KERNEL_THREAD,
    NO_EXECUTABLE,
    UNREADABLE,
    ElfPage,
    Executable,
    KernelModule,
    MemorySnapshot,
    Process,
)
from hostguard.signed.findings import (
    CHECK_UNAVAILABLE,
    DELETED_EXECUTABLE,
    UNKNOWN_MODULE,
    UNKNOWN_PROCESS,
    UNLISTED_ELF,
    finding_policy,
)
from hostguard.signed.manifest import FileEntry

UUID = "8dc6ab89-dfa1-4b3d-8061-c9f4c05d3bf2"
UUID2 = "00fe098c-78d2-4c69-add3-1ba9aec7fb4b"  # a rootfs (tmpfs) has a random one
RELEASE = "6.1.0-56-amd64"


def entry(path: str) -> FileEntry:
    return FileEntry(path, "0" * 64, 1, 0o755, 0, 0)


FILES = [
    entry("/bin/busybox"),
    entry("/usr/bin/sleep"),
    entry("/sbin/init"),
    entry(f"/lib/modules/{RELEASE}/kernel/drivers/block/virtio_blk.ko.xz"),
    entry(f"/usr/lib/modules/{RELEASE}/kernel/fs/fuse/fuse.ko"),
    entry("/lib/modules/5.10.0-1-amd64/kernel/fs/old/oldmod.ko"),
    entry(f"/lib/modules/{RELEASE}/kernel/net/dash-name.ko.zst"),
]
DISK = DiskReference({"/bin/busybox": DiskFile(15, UUID), "/usr/bin/sleep": DiskFile(15, UUID)})


def exe(
    path: str, inode: int = 15, *, uuid: str | None = UUID, deleted: bool = False, fstype: str = "ext4"
) -> Executable:
    return Executable(path, inode, "254:0", fstype, uuid, deleted, 0 if deleted else 2)


def proc(pid: int, comm: str, executable: Executable | None, status: str = "running") -> Process:
    return Process(pid, pid, 1, comm, status == KERNEL_THREAD, executable, None, status)


def snapshot(
    *procs: Process, modules: tuple[str, ...] = ("virtio_blk",), anomalies: tuple[str, ...] = ()
) -> MemorySnapshot:
    return MemorySnapshot(
        RELEASE,
        "ab" * 20,
        "elf-note",
        "kernel-file",
        "kernel-file",
        procs,
        tuple(KernelModule(m, "live") for m in modules),
        anomalies,
    )


CLEAN = snapshot(
    proc(1, "init", exe("/bin/busybox")),
    proc(2, "kthreadd", None, KERNEL_THREAD),
    proc(108, "sleep", exe("/usr/bin/sleep")),
    proc(200, "dying", None, EXITING),
)


def test_clean_guest_has_no_findings() -> None:
    assert compare_memory(FILES, CLEAN, disk=DISK) == []


def test_unknown_process_names_its_path_and_pids() -> None:
    snap = snapshot(
        proc(1, "init", exe("/bin/busybox")),
        proc(300, "miner", exe("/tmp/miner", 7, fstype="tmpfs")),
        proc(301, "miner", exe("/tmp/miner", 7, fstype="tmpfs")),
    )
    findings = compare_memory(FILES, snap, disk=DISK)
    assert [(f.kind, f.path) for f in findings] == [(UNKNOWN_PROCESS, "/tmp/miner")]
    assert "pid 300 (miner), pid 301 (miner) runs /tmp/miner inode 7 on tmpfs" in (findings[0].found or "")


def test_listed_path_on_another_filesystem_or_inode_is_unknown() -> None:
    # same path, but a tmpfs mounted over /bin, or a bind mount of another file
    snap = snapshot(
        proc(1, "init", exe("/bin/busybox", 15, uuid=None, fstype="tmpfs")), proc(2, "sleep", exe("/usr/bin/sleep", 99))
    )
    findings = compare_memory(FILES, snap, disk=DISK)
    assert [(f.kind, f.path, f.expected) for f in findings] == [
        (UNKNOWN_PROCESS, "/bin/busybox", f"on filesystem {UUID}"),
        (UNKNOWN_PROCESS, "/usr/bin/sleep", "inode 15"),
    ]
    # without the disk check's view only the path can be compared
    assert compare_memory(FILES, snap) == []


def test_deleted_executable_is_reported_even_when_listed() -> None:
    snap = snapshot(proc(1, "init", exe("/bin/busybox")), proc(108, "sleep", exe("/usr/bin/sleep", deleted=True)))
    findings = compare_memory(FILES, snap, disk=DISK)
    assert [(f.kind, f.path) for f in findings] == [(DELETED_EXECUTABLE, "/usr/bin/sleep")]
    assert "pid 108 (sleep) runs /usr/bin/sleep (deleted)" in (findings[0].found or "")


def test_the_signed_initrds_files_may_run_from_rootfs_only_before_switch_root() -> None:
    # Checked while the guest is still in its initramfs (seen under back-to-back checks: its init script and an
    # insmod, both the initrd's busybox on rootfs): the signed boot, not an unknown process.
    boot = {"/bin/busybox", "/init"}
    early = snapshot(
        proc(1, "init", exe("/bin/busybox", 12, uuid=UUID2, fstype="rootfs")),
        proc(95, "insmod", exe("/bin/busybox", 12, uuid=UUID2, fstype="rootfs")),
    )
    assert compare_memory(FILES, early, disk=DISK, boot_files=boot) == []
    # a file the initrd does not hold, even on rootfs, is unknown
    other = snapshot(*early.processes, proc(96, "x", exe("/tmp/x", 13, uuid=UUID2, fstype="rootfs")))
    findings = compare_memory(FILES, other, disk=DISK, boot_files=boot)
    assert [(f.kind, f.path) for f in findings] == [(UNKNOWN_PROCESS, "/tmp/x")]
    # after switch_root (pid 1 runs from the real root) the initramfs is no place to run from: a chroot escape
    late = snapshot(
        proc(1, "init", exe("/bin/busybox")), proc(300, "x", exe("/bin/busybox", 12, uuid=UUID2, fstype="rootfs"))
    )
    findings = compare_memory(FILES, late, disk=DISK, boot_files=boot)
    assert [(f.kind, f.path, f.expected) for f in findings] == [
        (UNKNOWN_PROCESS, "/bin/busybox", f"on filesystem {UUID}")
    ]


def test_deleted_and_unlisted_gives_both_findings() -> None:
    snap = snapshot(proc(5, "x", exe("/hgt/x", 3, deleted=True, fstype="rootfs", uuid=None)))
    assert sorted((f.kind, f.path) for f in compare_memory(FILES, snap)) == [
        (DELETED_EXECUTABLE, "/hgt/x"),
        (UNKNOWN_PROCESS, "/hgt/x"),
    ]


def test_processes_without_a_readable_executable_fail_closed() -> None:
    snap = snapshot(
        Process(7, 7, 1, "ghost", False, None, "executable unreadable: bad address", UNREADABLE),
        Process(8, 8, 1, "noexe", False, None, "no executable file", NO_EXECUTABLE),
        Process(9, 9, 1, "zombie", False, None, "no address space", EXITING),
    )
    findings = compare_memory(FILES, snap)
    assert [(f.kind, f.path) for f in findings] == [(UNKNOWN_PROCESS, "pid:7"), (UNKNOWN_PROCESS, "pid:8")]
    assert "executable unreadable" in (findings[0].found or "")


def test_many_processes_are_summarised() -> None:
    snap = snapshot(*(proc(1000 + i, "w", exe("/opt/w", 5)) for i in range(20)))
    (finding,) = compare_memory(FILES, snap)
    assert "and 12 more" in (finding.found or "")


def test_modules_from_manifest_of_this_release_or_initrd_only() -> None:
    assert manifest_module_names(FILES, RELEASE) == {"virtio_blk", "fuse", "dash_name"}
    snap = snapshot(modules=("virtio_blk", "fuse", "dash_name", "ext4", "oldmod", "rootkit"))
    findings = compare_memory(FILES, snap, boot_modules=["ext4"])
    assert [(f.kind, f.path) for f in findings] == [(UNKNOWN_MODULE, "oldmod"), (UNKNOWN_MODULE, "rootkit")]
    assert RELEASE in (findings[0].expected or "")


def test_unavailable_and_anomalies_become_check_unavailable() -> None:
    (f,) = compare_memory(FILES, None, unavailable_reason="no BTF: the kernel file has no .BTF section")
    assert (f.kind, f.path) == (CHECK_UNAVAILABLE, MEMORY_PATH)
    assert f.found == "memory check unavailable: no BTF: the kernel file has no .BTF section"
    findings = compare_memory(FILES, snapshot(anomalies=("task list has a cycle at 0x1",)))
    assert [(f.kind, f.found) for f in findings] == [
        (CHECK_UNAVAILABLE, "memory check unavailable: incomplete: task list has a cycle at 0x1")
    ]
    (e,) = compare_memory(FILES, CLEAN, elf_unavailable_reason="no disk reference")
    assert (e.kind, e.path) == (CHECK_UNAVAILABLE, ELF_SCAN_PATH)
    # policy: by default, unavailable is logged, not acted on
    assert finding_policy("pause", {}, {}).action_for([f, e]) == "log"


def page(digest: str, address: int = 0x1000, *, kernel: bool = False) -> ElfPage:
    return ElfPage(address, "dyn", 62, 2, digest, kernel)


def test_elf_pages_known_baseline_and_unlisted() -> None:
    known, vdso, evil = "a" * 64, "b" * 64, "c" * 64
    pages = [page(known), page(vdso, 0x9000000, kernel=True), page(evil, 0x2000), page(evil, 0x3000)]
    findings = compare_memory(FILES, CLEAN, disk=DISK, elf_pages=pages, known_heads={known}, baseline={vdso})
    assert [(f.kind, f.path) for f in findings] == [(UNLISTED_ELF, f"elf:{evil}")]
    assert "0x2000, 0x3000" in (findings[0].found or "") and "ELF64 dyn machine 62" in (findings[0].found or "")


def test_kernel_image_pages_without_baseline_are_not_judged_but_said() -> None:
    pages = [page("b" * 64, 0x9000000, kernel=True), page("d" * 64, 0x9001000, kernel=True)]
    (f,) = compare_memory(FILES, CLEAN, elf_pages=pages, known_heads=set(), baseline=None)
    assert (f.kind, f.path) == (CHECK_UNAVAILABLE, ELF_SCAN_PATH) and "2 ELF page(s)" in (f.found or "")
    # with a baseline, a kernel-image page that is not in it is flagged
    (g,) = compare_memory(FILES, CLEAN, elf_pages=pages, known_heads=set(), baseline={"b" * 64})
    assert (g.kind, g.path) == (UNLISTED_ELF, "elf:" + "d" * 64) and "not in the vDSO baseline" in (g.found or "")


def test_findings_are_sorted_and_stable() -> None:
    snap = snapshot(proc(3, "z", exe("/z", 1)), proc(2, "a", exe("/a", 2, deleted=True)), modules=("zz", "aa"))
    first = compare_memory(FILES, snap)
    assert first == compare_memory(FILES, snapshot(*reversed(snap.processes), modules=("aa", "zz")))
    assert [f.kind for f in first] == sorted(f.kind for f in first)
