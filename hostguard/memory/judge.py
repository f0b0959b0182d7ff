"""Compare what memory shows with the signed manifest. Pure: records in, findings out (sorted, stable).

Rules:
* every user process's executable must be a manifest entry: same path and, when the disk check's view is
  given (`DiskReference`), the same filesystem (UUID) and the same inode; otherwise `unknown-process`.
  While the guest is still in its initramfs (pid 1 runs from it: the kernel's initial `rootfs`, before
  switch_root execs the real init), a process may also run a file of the signed initrd (`boot_files`) from
  there. After that, anything run from rootfs is unknown (reaching it then takes a chroot escape).
  A process whose executable cannot be read counts as unknown (fail closed); kernel threads and exiting
  processes have no executable and are skipped.
* an executable unlinked since it started is `deleted-executable` (whatever its path), because what runs is
  no longer what the disk holds.
* every loaded kernel module must be a module file of the running release in the manifest, or one of the
  modules in the signed initrd (`boot_modules`); otherwise `unknown-module`.
* every ELF executable/shared-object header page must be the first page of a known file (`known_heads`:
  manifest files, the signed kernel and initrd contents) or, inside the kernel image, one of the kernel's
  own pages (`baseline`: the running copies of the signed kernel file's vDSO images, see `vdso`, plus any
  recorded baseline); otherwise `unlisted-elf-in-memory`. Only when neither exists (a kernel file without
  embedded images), kernel-image pages are not judged and the gap is reported as unavailable. A page the guest
  kernel uses as slab or has free is not judged: it keeps stale bytes of an earlier life, and no process can
  run code from it (`structpage`).
* a check that could not run is one `check-unavailable` finding saying why; policy decides what it costs.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from hostguard.memory.model import EXITING, NOT_IN_USE, ElfPage, MemorySnapshot, Process
from hostguard.record import Record, field
from hostguard.signed.findings import (
    CHECK_UNAVAILABLE,
    DELETED_EXECUTABLE,
    UNKNOWN_MODULE,
    UNKNOWN_PROCESS,
    UNLISTED_ELF,
    Finding,
)
from hostguard.signed.manifest import FileEntry

ROOTFS = "rootfs"  # the filesystem type of the kernel's initial root, where the initramfs is unpacked
MEMORY_PATH = "memory"  # the path of check-unavailable findings about the memory check
ELF_SCAN_PATH = "memory:elf-scan"
MAX_PIDS_SHOWN = 8
_MODULE_FILE = re.compile(r"(?:/usr)?/lib/modules/([^/]+)/.+/([^/]+?)\.ko(?:\.xz|\.zst|\.gz)?")


class DiskFile(Record):
    """Where the disk check found a file: filesystem UUID (None if it has none) and inode number."""

    inode: int
    fs_uuid: str | None = None


class DiskReference(Record):
    """The disk check's view of the manifest files, for identity checks beyond the path."""

    files: Mapping[str, DiskFile] = field(default_factory=dict)  # manifest path -> identity


def unavailable(why: str, path: str = MEMORY_PATH) -> Finding:
    return Finding(CHECK_UNAVAILABLE, path, "memory check available", f"memory check unavailable: {why}")


def module_name(name: str) -> str:
    """The kernel's spelling of a module name: dashes become underscores."""
    return name.replace("-", "_")


def manifest_module_names(files: Iterable[FileEntry], release: str) -> set[str]:
    out = set()
    for f in files:
        m = _MODULE_FILE.fullmatch(f.path)
        if m and m.group(1) == release:
            out.add(module_name(m.group(2)))
    return out


def compare_memory(
    files: Sequence[FileEntry],
    snapshot: MemorySnapshot | None,
    *,
    unavailable_reason: str | None = None,
    disk: DiskReference | None = None,
    boot_modules: Collection[str] = (),
    boot_files: Collection[str] = (),
    elf_pages: Sequence[ElfPage] | None = None,
    known_heads: Collection[str] = (),
    baseline: Collection[str] | None = None,
    elf_unavailable_reason: str | None = None,
) -> list[Finding]:
    """Findings for one inspection. `snapshot` None means the process/module analysis could not run
    (`unavailable_reason` says why); `elf_pages` None means the ELF scan did not run."""
    findings: list[Finding] = []
    if snapshot is None:
        findings.append(unavailable(unavailable_reason or "no analysis"))
    else:
        findings += _processes(files, snapshot.processes, disk, boot_files)
        findings += _modules(files, snapshot, boot_modules)
        findings += [unavailable(f"incomplete: {a}") for a in snapshot.anomalies]
    if elf_pages is None:
        if elf_unavailable_reason:
            findings.append(unavailable(elf_unavailable_reason, ELF_SCAN_PATH))
    else:
        findings += _elf(elf_pages, known_heads, baseline)
    return sorted(set(findings), key=lambda f: (f.kind, f.path, f.expected or "", f.found or ""))


def _pids(procs: list[Process]) -> str:
    shown = ", ".join(p.describe() for p in sorted(procs, key=lambda p: p.pid)[:MAX_PIDS_SHOWN])
    more = len(procs) - MAX_PIDS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _in_initramfs(processes: Sequence[Process]) -> bool:
    """Pid 1 runs from the initial rootfs: the guest has not switched to its real root yet."""
    return any(p.pid == 1 and p.exe is not None and p.exe.fstype == ROOTFS for p in processes)


def _processes(
    files: Sequence[FileEntry],
    processes: Sequence[Process],
    disk: DiskReference | None,
    boot_files: Collection[str] = (),
) -> list[Finding]:
    listed = {f.path for f in files}
    initrd = set(boot_files) if _in_initramfs(processes) else set()
    unknown: dict[tuple[str, str | None], list[Process]] = {}
    deleted: dict[str, list[Process]] = {}
    for p in processes:
        if p.kernel_thread:
            continue
        exe = p.exe
        if exe is None:
            if p.status == EXITING:
                continue
            unknown.setdefault((f"pid:{p.pid}", None), []).append(p)
            continue
        if exe.deleted:
            deleted.setdefault(exe.path, []).append(p)
        elif exe.fstype == ROOTFS and exe.path in initrd:
            continue  # the signed initrd's own file, run before switch_root
        if exe.path not in listed:
            unknown.setdefault((exe.path, None), []).append(p)
            continue
        ref = disk.files.get(exe.path) if disk is not None else None
        if ref is None:
            continue
        if ref.fs_uuid is not None and exe.fs_uuid != ref.fs_uuid:
            unknown.setdefault((exe.path, f"on filesystem {ref.fs_uuid}"), []).append(p)
        elif ref.inode != exe.inode:
            unknown.setdefault((exe.path, f"inode {ref.inode}"), []).append(p)
    out = []
    for (path, expected), procs in unknown.items():
        first = procs[0]
        if first.exe is None:
            what = f"{_pids(procs)}: {first.problem or 'no executable'}"
        elif expected is None:
            what = f"{_pids(procs)} runs {first.exe.describe()}"
        else:
            what = f"{_pids(procs)} runs {first.exe.describe()} (uuid {first.exe.fs_uuid})"
        out.append(Finding(UNKNOWN_PROCESS, path, expected or "a manifest entry", what))
    for path, procs in deleted.items():
        assert procs[0].exe is not None
        what = f"{_pids(procs)} runs {procs[0].exe.describe()}"
        out.append(Finding(DELETED_EXECUTABLE, path, "the file on disk", what))
    return out


def _modules(files: Sequence[FileEntry], snapshot: MemorySnapshot, boot_modules: Collection[str]) -> list[Finding]:
    allowed = manifest_module_names(files, snapshot.kernel_release) | {module_name(m) for m in boot_modules}
    out = []
    for m in snapshot.modules:
        if module_name(m.name) not in allowed:
            expected = f"a module of {snapshot.kernel_release} in the manifest or initrd"
            out.append(Finding(UNKNOWN_MODULE, m.name, expected, f"loaded ({m.state})"))
    return out


def elf_page_unlisted(page: ElfPage, known: Collection[str], baseline: Collection[str] | None) -> bool:
    """A finding: the first page of no manifest file (nor, in the kernel image, a page of the kernel's own),
    in a page the guest kernel has in use (a slab or free page keeps stale bytes; nothing runs from it)."""
    if page.sha256 in known or page.use in NOT_IN_USE:
        return False
    if page.in_kernel_image:
        return baseline is not None and page.sha256 not in baseline
    return True


def _elf(pages: Sequence[ElfPage], known_heads: Collection[str], baseline: Collection[str] | None) -> list[Finding]:
    known = set(known_heads)
    unlisted: dict[str, list[ElfPage]] = {}
    unjudged = 0
    for page in pages:
        if page.use in NOT_IN_USE:
            continue
        if page.in_kernel_image and baseline is None and page.sha256 not in known:
            unjudged += 1
        elif elf_page_unlisted(page, known, baseline):
            unlisted.setdefault(page.sha256, []).append(page)
    out = []
    for digest, hits in unlisted.items():
        where = ", ".join(f"{p.address:#x}" for p in hits[:MAX_PIDS_SHOWN])
        more = f" and {len(hits) - MAX_PIDS_SHOWN} more" if len(hits) > MAX_PIDS_SHOWN else ""
        first = hits[0]
        kind = f"ELF{32 if first.elf_class == 1 else 64} {first.e_type} machine {first.machine}"
        region = " (in the kernel image: not in the vDSO baseline)" if first.in_kernel_image else ""
        out.append(
            Finding(
                UNLISTED_ELF,
                f"elf:{digest}",
                "the first page of a manifest file",
                f"{kind} header page at {where}{more}{region}",
            )
        )
    if unjudged:
        why = f"{unjudged} ELF page(s) in the kernel image not judged: no vDSO baseline for this kernel"
        out.append(unavailable(why, ELF_SCAN_PATH))
    return out
