"""Memory introspection against real TCG guests booted through the real libvirtd (no mocks).

One clean reference boot per module (its vDSO pages become the kernel's baseline, its dumps feed the
"unavailable" tests); one boot whose initramfs leaves a program running that is on no disk; one boot whose
initramfs starts a program from the root disk and then deletes it. Manifests are built from the test bed's
known content; the kernel and initrd they list are the test bed's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hostguard.memory import kernel as kernelmod
from hostguard.memory import structpage
from hostguard.memory.acquire import AcquisitionError, memory_dump
from hostguard.memory.analyze import AnalysisOptions
from hostguard.memory.checkconfig import check_config
from hostguard.memory.diskref import DiskFacts, disk_facts
from hostguard.memory.elfscan import head_page_sha256
from hostguard.memory.inspect import Inputs, MemoryReport, inspect_domain_memory, inspect_dump, record_vdso_baseline
from hostguard.memory.vmlinux import Vmlinux, extract_vmlinux
from hostguard.signed.findings import CHECK_UNAVAILABLE, DELETED_EXECUTABLE, UNKNOWN_PROCESS, UNLISTED_ELF, Finding
from hostguard.signed.manifest import Blob, BootFiles, DiskEntry, FileEntry, ImageId, Manifest
from tests.testbed import content, guests
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration
T = TypeVar("T")

INTRUDER = "/hgt/busybox-intruder"
START_RETRY_SECONDS = 600.0
# Where the initramfs init is extended: before /dev moves, while /proc is still mounted.
ANCHOR = 'mount --move /dev /newroot/dev || fail "cannot move /dev"\n'


# --- helpers -------------------------------------------------------------------------------------------------


def build_initrd(version: str, out: Path, *, files: dict[str, bytes], before_switch: str) -> Path:
    """The test bed's initramfs (same modules, same init) plus `files` and shell lines run just before
    /dev moves to the new root (the root is mounted at /newroot then, /proc still mounted)."""
    assert ANCHOR in guests.INITRAMFS_INIT, "the test bed's initramfs init changed: update ANCHOR"
    with tempfile.TemporaryDirectory(prefix="hgt-meminitrd-") as tmp:
        tree = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
            (tree / d).mkdir(parents=True)
        shutil.copy2(content.BUSYBOX, tree / "bin/busybox")
        init = guests.INITRAMFS_INIT.replace(ANCHOR, before_switch + ANCHOR)
        (tree / "init").write_text(init)
        (tree / "init").chmod(0o755)
        loaded = []
        for rel in guests.module_closure(version, guests.INITRAMFS_MODULES):
            dest = guests._uncompressed_name(rel).rsplit("/", 1)[-1]
            (tree / "lib/modules" / dest).write_bytes(content.read_module(Path("/lib/modules") / version / rel))
            loaded.append(dest)
        (tree / "modules.order").write_text("\n".join(loaded) + "\n")
        for name, data in files.items():
            target = tree / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o755)
        guests.write_cpio_gz(tree, out)
    out.chmod(0o644)
    return out


def intruder_bytes() -> bytes:
    """busybox with one byte of its ELF header padding changed: runs the same, matches no manifest file."""
    data = bytearray(content.BUSYBOX.read_bytes())
    data[9] = 0x48  # e_ident[EI_PAD]: ignored by the kernel's loader
    return bytes(data)


def root_disk_facts(guest: Guest, manifest: Manifest) -> DiskFacts:
    """The disk check's view of `guest`'s root disk, for matching ELF pages with the manifest's files."""
    from hostguard.imagefs.readers import open_reader

    with open_reader([(guest.root_qcow2, "qcow2")]) as reader:
        return disk_facts(reader, manifest)


def manifest_for(guest: Guest, kernel: Path | None = None) -> Manifest:
    files = tuple(
        FileEntry(e.path, e.sha256, e.size, e.mode, e.uid, e.gid, e.capabilities)
        for e in guest.expected.values()
        if e.executable_component
    )
    kernel = kernel or guest.kernel
    boot = BootFiles(
        Blob(kernelmod.file_sha256(kernel), kernel.stat().st_size),
        Blob(kernelmod.file_sha256(guest.initrd), guest.initrd.stat().st_size),
    )
    now = datetime.now(UTC)
    disk = DiskEntry(kernelmod.file_sha256(guest.root_qcow2), guest.root_qcow2.stat().st_size, "qcow2")
    return Manifest(ImageId("hgt-busybox", 1), now - timedelta(hours=1), now + timedelta(days=1), (disk,), files, boot)


def _transient(err: Exception, env: LibvirtEnv) -> bool:
    """A libvirt failure caused by another session: its temporary hook denied us, or libvirtd restarted."""
    import libvirt

    if "hostguard: denied" in str(err):
        return True
    if isinstance(err, (AcquisitionError, libvirt.libvirtError)):
        try:
            return not env.conn.isAlive()
        except libvirt.libvirtError:
            return True
    return False


def retrying(env: LibvirtEnv, action: Callable[[], T], seconds: float = START_RETRY_SECONDS) -> T:
    """Run `action`, again after a transient libvirt failure (see `_transient`), until `seconds` pass."""
    import libvirt

    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except (libvirt.libvirtError, AcquisitionError) as err:
            if not _transient(err, env) or time.monotonic() > deadline:
                raise
            time.sleep(3)
            env.connection()


def start(env: LibvirtEnv, dom: Any, guest: Guest, timeout: float = 240.0) -> Any:
    """Start `dom` and wait for the guest's marker on its console, riding out libvirtd restarts."""
    import libvirt

    name = dom.name()
    retrying(env, lambda: env.connection().lookupByName(name).create())
    deadline = time.monotonic() + timeout
    console = env.consoles[name]
    while True:
        text = console.read_bytes().decode("utf-8", "replace") if console.exists() else ""
        if guest.marker in text:
            break
        assert guests.FAIL_MARKER not in text, text[-3000:]
        try:
            active = env.connection().lookupByName(name).isActive()
        except libvirt.libvirtError:
            active = True  # libvirtd is restarting: QEMU keeps running meanwhile
        assert active, f"{name} stopped before its marker:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"{name}: no marker within {timeout:.0f} s:\n{text[-3000:]}"
        time.sleep(0.2)
    time.sleep(1.0)  # let init start its background programs
    return env.connection().lookupByName(name)


def inspect(env: LibvirtEnv, name: str, ref: Reference) -> MemoryReport:
    return inspect_guest(env, name, ref.guest, ref.manifest, ref.workdir, ref.disk)


def inspect_guest(
    env: LibvirtEnv, name: str, guest: Guest, manifest: Manifest, workdir: Path, disk: DiskFacts | None
) -> MemoryReport:
    """The in-place check of domain `name` booted from `guest`'s kernel and initrd, riding out restarts."""
    return retrying(
        env,
        lambda: inspect_domain_memory(
            name,
            manifest,
            guest.kernel,
            workdir,
            conn=env.connection(),
            initrd_path=guest.initrd,
            disk=disk,
        ),
    )


def processes(report: MemoryReport) -> dict[int, Any]:
    assert report.snapshot is not None, report.unavailable
    return {p.pid: p for p in report.snapshot.processes}


def kinds(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.path) for f in findings]


@dataclass
class Reference:
    env: LibvirtEnv
    guest: Guest
    name: str
    manifest: Manifest
    disk: DiskFacts
    workdir: Path

    @property
    def domain(self) -> Any:
        return retrying(self.env, lambda: self.env.connection().lookupByName(self.name))

    def dump_to(self, dest: Path) -> Path:
        """A copy of a fresh memory dump of the reference domain (the original is removed at once)."""

        def take() -> Path:
            with memory_dump(self.domain, self.workdir) as dump:
                shutil.copyfile(dump.path, dest)
            return dest

        return retrying(self.env, take)

    def inputs(self, **kwargs: Any) -> Inputs:
        return Inputs(self.manifest, kwargs.pop("kernel", self.guest.kernel), self.guest.initrd, self.disk, **kwargs)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hgt-memory-"))
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(busybox_guest: Guest, workdir: Path) -> Iterator[Reference]:
    """A clean busybox guest, running for the whole module; its vDSO pages are recorded as the baseline."""
    from tests.testbed.prereq import require_root

    require_root()
    manifest = manifest_for(busybox_guest)
    disk = root_disk_facts(busybox_guest, manifest)
    with LibvirtEnv() as env:
        name = start(env, env.define_guest("reference", busybox_guest), busybox_guest).name()
        baseline = retrying(
            env,
            lambda: record_vdso_baseline(
                name,
                manifest,
                busybox_guest.kernel,
                workdir,
                conn=env.connection(),
                initrd_path=busybox_guest.initrd,
                disk=disk,
            ),
        )
        assert len(baseline.pages) >= 1
        yield Reference(env, busybox_guest, name, manifest, disk, workdir)


# --- tests ---------------------------------------------------------------------------------------------------


def test_clean_guest_lists_init_and_sleep_and_has_no_findings(reference: Reference) -> None:
    report = inspect(reference.env, reference.name, reference)
    procs = processes(report)
    # pid 1 runs the script /sbin/init; the kernel executes its interpreter, so the executable is busybox
    init = procs[1]
    assert init.comm == "init"
    assert init.exe is not None and init.exe.path == "/bin/busybox"
    assert init.exe.inode == reference.disk.reference.files["/bin/busybox"].inode
    assert init.exe.fstype == "ext4" and not init.exe.deleted
    sleeps = [p for p in procs.values() if p.exe is not None and p.exe.path == "/usr/bin/sleep"]
    assert sleeps, [p.to_json() for p in procs.values() if not p.kernel_thread]
    assert sleeps[0].ppid == 1 and sleeps[0].comm == "sleep"
    assert any(p.kernel_thread and p.comm == "kthreadd" for p in procs.values())
    assert report.snapshot is not None
    assert {"virtio_blk", "ext4", "qemu_fw_cfg"} <= {m.name for m in report.snapshot.modules}
    assert report.snapshot.btf_source == "kernel-file" and report.snapshot.symbols_source == "kernel-file"
    assert report.findings == [], [f.describe() for f in report.findings]
    assert report.elf_pages and any(p.in_kernel_image for p in report.elf_pages)
    # read in place: nothing written, a few MiB read, the guest running again
    assert report.method == "in-place" and report.dump_bytes == 0 and report.bytes_read > 0
    assert report.snapshot.vmcoreinfo_source == "memory-scan"
    assert not (reference.workdir / "dumps").exists() or not list((reference.workdir / "dumps").iterdir())
    assert reference.domain.state()[0] == 1  # VIR_DOMAIN_RUNNING


def test_the_dump_path_still_works_and_sees_the_same(reference: Reference) -> None:
    in_place = inspect(reference.env, reference.name, reference)
    report = retrying(
        reference.env,
        lambda: inspect_domain_memory(
            reference.name,
            reference.manifest,
            reference.guest.kernel,
            reference.workdir,
            conn=reference.env.connection(),
            initrd_path=reference.guest.initrd,
            disk=reference.disk,
            method="dump",
        ),
    )
    assert report.method == "dump" and report.findings == [], [f.describe() for f in report.findings]
    assert report.snapshot is not None and report.snapshot.vmcoreinfo_source == "elf-note"
    assert report.timings["dump"] > 0 and report.dump_bytes >= 256 << 20
    assert not list((reference.workdir / "dumps").iterdir()), "the dump must be removed after analysis"
    same = {(p.pid, p.exe.path if p.exe else None) for p in processes(report).values() if p.comm != "sleep"}
    assert same <= {(p.pid, p.exe.path if p.exe else None) for p in processes(in_place).values()}


def test_no_admin_baseline_the_signed_kernel_judges_its_own_pages(reference: Reference, tmp_path: Path) -> None:
    """A guest checked with no vDSO baseline ever recorded: the kernel file's own vDSO images judge the kernel's
    ELF pages, so the verdict is full (no "not judged" note) without an admin step."""
    fresh = tmp_path / "work"
    fresh.mkdir(mode=0o700)
    report = inspect(reference.env, reference.name, dataclasses.replace(reference, workdir=fresh))
    assert not (fresh / "baselines").exists()
    assert report.elf_pages is not None and sum(p.in_kernel_image for p in report.elf_pages) >= 1
    assert report.findings == [], [f.describe() for f in report.findings]


def test_dump_is_root_only_while_it_exists_and_suspend_resumes(reference: Reference) -> None:
    import libvirt

    dom = reference.domain
    with memory_dump(dom, reference.workdir, suspend=True) as dump:
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        mode = dump.path.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == 0
        assert stat.S_IMODE(dump.path.parent.stat().st_mode) == 0o700
        assert dump.size >= 256 << 20 and dump.suspended
        path = dump.path
    assert not path.exists()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_kernel_without_btf_is_unavailable_not_a_crash(reference: Reference, tmp_path: Path) -> None:
    # A kernel file without BTF: the guest's vmlinux with its .BTF section renamed (same build id).
    vmlinux = tmp_path / "vmlinux-nobtf"
    with vmlinux.open("wb") as out:
        extract_vmlinux(reference.guest.kernel, out)
    data = bytearray(vmlinux.read_bytes())
    btf = Vmlinux(bytes(data)).section(".BTF")
    assert btf is not None and len(btf) > 1 << 20
    name_at = data.rindex(b"\0.BTF\0") + 1  # in .shstrtab, the last section's data
    data[name_at : name_at + 4] = b".XTF"
    vmlinux.write_bytes(data)
    manifest = manifest_for(reference.guest, kernel=vmlinux)

    dump = reference.dump_to(tmp_path / "reference.core")
    no_fallback = AnalysisOptions(allow_memory_btf=False)
    strict = inspect_dump(
        dump, Inputs(manifest, vmlinux, reference.guest.initrd, reference.disk, no_fallback), reference.workdir
    )
    assert strict.snapshot is None
    assert strict.unavailable and "no .BTF section" in strict.unavailable
    assert [f.kind for f in strict.findings if f.path == "memory"] == [CHECK_UNAVAILABLE]
    assert "memory check unavailable: no BTF" in (strict.findings[0].found or "")

    # with the fallback allowed, the BTF in guest memory is used (and said so)
    fallback = inspect_dump(dump, Inputs(manifest, vmlinux, reference.guest.initrd, reference.disk), reference.workdir)
    assert fallback.snapshot is not None and fallback.snapshot.btf_source == "guest-memory"
    assert any("BTF taken from guest memory" in w for w in fallback.snapshot.warnings)
    assert processes(fallback)[1].exe is not None

    # and a guest kernel without BTF in memory either: the dump with its BTF blob wiped
    wiped = dump
    raw = bytearray(wiped.read_bytes())
    at = raw.index(btf[:4096])
    raw[at : at + 4096] = bytes(4096)
    wiped.write_bytes(raw)
    del raw
    report = inspect_dump(wiped, Inputs(manifest, vmlinux, reference.guest.initrd, reference.disk), reference.workdir)
    assert report.snapshot is None
    assert report.unavailable and "no BTF" in report.unavailable and "guest's BTF is unusable" in report.unavailable
    assert kinds(report.findings)[0] == (CHECK_UNAVAILABLE, "memory")


def test_a_changed_vdso_is_not_the_kernels_own_page(reference: Reference, tmp_path: Path) -> None:
    """The kernel-image ELF pages are judged against the signed kernel file's vDSO images, whole: a byte
    changed on the image's second page (its ELF header page untouched) makes the header page unlisted."""
    import mmap

    from hostguard.memory.elfscan import _load_segments

    dump = reference.dump_to(tmp_path / "vdso.core")
    fresh = tmp_path / "work"
    fresh.mkdir(mode=0o700)  # no recorded baseline: the kernel file is the only reference
    clean = inspect_dump(dump, reference.inputs(), fresh)
    assert clean.findings == [], [f.describe() for f in clean.findings]
    assert clean.elf_pages is not None
    vdso64 = next(p for p in clean.elf_pages if p.in_kernel_image and p.elf_class == 2)
    with dump.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        offset, paddr, _size = next(s for s in _load_segments(m) if s[1] <= vdso64.address < s[1] + s[2])
        at = offset + vdso64.address - paddr + 4096 + 16  # inside the image's second page
        m[at] ^= 0xFF
    report = inspect_dump(dump, reference.inputs(), fresh)
    assert kinds(report.findings) == [(UNLISTED_ELF, f"elf:{vdso64.sha256}")], [f.describe() for f in report.findings]
    assert "in the kernel image" in (report.findings[0].found or "")


def test_without_the_vmcoreinfo_note_the_in_memory_copy_is_used(reference: Reference, tmp_path: Path) -> None:
    copy = reference.dump_to(tmp_path / "nonote.core")
    with copy.open("r+b") as f:
        head = f.read(1 << 16)
        at = head.index(b"VMCOREINFO\0")
        f.seek(at)
        f.write(b"XMCOREINFO")  # the note is no longer recognised: as with a guest without qemu_fw_cfg
    report = inspect_dump(copy, reference.inputs(), reference.workdir)
    assert report.snapshot is not None and report.snapshot.vmcoreinfo_source == "memory-scan"
    assert processes(report)[1].exe is not None
    assert report.findings == [], [f.describe() for f in report.findings]


def test_without_a_kernel_file_symbols_and_btf_come_from_guest_memory_with_warnings(
    reference: Reference, tmp_path: Path
) -> None:
    dump = reference.dump_to(tmp_path / "nokernel.core")
    report = inspect_dump(
        dump, Inputs(reference.manifest, None, reference.guest.initrd, reference.disk), reference.workdir
    )
    assert report.snapshot is not None
    assert report.snapshot.symbols_source == "guest-memory" and report.snapshot.btf_source == "guest-memory"
    assert len(report.snapshot.warnings) == 2
    assert processes(report)[1].exe is not None
    # the processes still match; the ELF scan needs the kernel file to place the kernel image
    assert kinds(report.findings) == [(CHECK_UNAVAILABLE, "memory:elf-scan")]
    assert report.snapshot.processes == inspect_dump(dump, reference.inputs(), reference.workdir).snapshot.processes  # type: ignore[union-attr]


def test_program_from_the_initramfs_is_an_unknown_process_and_an_unlisted_elf(
    reference: Reference, libvirt_env: LibvirtEnv
) -> None:
    guest = reference.guest
    initrd = build_initrd(
        guest.kernel_version,
        libvirt_env.path("intruder-initrd.img"),
        files={"/intruder": intruder_bytes()},
        before_switch=(
            "mkdir -p /hgt && mount -t tmpfs -o mode=0755 hgt /hgt && cp /intruder /hgt/busybox-intruder\n"
            f"{INTRUDER} sleep 86400 </dev/null >/dev/null 2>&1 &\n"
            # Wait for the exec: the child opens /dev/null first, and /dev moves to the new root next. Under
            # load the child lost that race, found no /dev/null and never ran the intruder (a flaky test).
            "i=0\n"
            f'while [ "$(busybox readlink /proc/$!/exe)" != {INTRUDER} ]; do\n'
            '  i=$((i + 1)); [ "$i" -gt 1000 ] && fail "the intruder did not start"; busybox sleep 0.01\n'
            "done\n"
        ),
    )
    dom = start(libvirt_env, libvirt_env.define_guest("intruder", guest, initrd=initrd), guest)
    report = inspect(libvirt_env, dom.name(), reference)
    intruders = [p for p in processes(report).values() if p.exe is not None and p.exe.path == INTRUDER]
    seen = " ".join(f"{p.pid}:{p.comm}:{p.exe.path}" for p in processes(report).values() if p.exe is not None)
    assert len(intruders) == 1 and intruders[0].exe is not None, seen  # on failure: what the walk did see
    assert intruders[0].exe.fstype == "tmpfs" and not intruders[0].exe.deleted
    unknown = [f for f in report.findings if f.kind == UNKNOWN_PROCESS]
    assert [f.path for f in unknown] == [INTRUDER]
    assert f"pid {intruders[0].pid} (busybox-intrud" in (unknown[0].found or "")
    elf = [f for f in report.findings if f.kind == UNLISTED_ELF]
    assert [f.path for f in elf] == [f"elf:{head_page_sha256(intruder_bytes())}"]
    # its page is in the tmpfs page cache: in use, so judged (a slab or free page would not be)
    assert report.elf_pages is not None
    assert [p.use for p in report.elf_pages if "elf:" + p.sha256 == elf[0].path] == ["in use"]
    # nothing else: the vDSO baseline recorded from the reference boot holds for this boot too
    assert sorted(kinds(report.findings)) == sorted([(UNKNOWN_PROCESS, INTRUDER), (UNLISTED_ELF, elf[0].path)])


def test_program_deleted_after_it_started_is_a_deleted_executable(
    reference: Reference, libvirt_env: LibvirtEnv
) -> None:
    guest = reference.guest
    initrd = build_initrd(
        guest.kernel_version,
        libvirt_env.path("deleted-initrd.img"),
        files={},
        before_switch=(
            "/newroot/usr/bin/sleep 86400 </dev/null >/dev/null 2>&1 &\n"
            "victim=$!\n"
            "i=0\n"
            'while [ "$(readlink /proc/$victim/exe)" != /newroot/usr/bin/sleep ] && [ $i -lt 100 ]; do\n'
            "  i=$((i + 1)); sleep 0.05\n"
            "done\n"
            "rm /newroot/usr/bin/sleep || fail 'cannot delete /usr/bin/sleep'\n"
        ),
    )
    dom = start(
        libvirt_env, libvirt_env.define_guest("deleted", guest, initrd=initrd, cmdline_extra="hostguard.rw=1"), guest
    )
    report = inspect(libvirt_env, dom.name(), reference)
    victims = [p for p in processes(report).values() if p.exe is not None and p.exe.path == "/usr/bin/sleep"]
    assert len(victims) == 1 and victims[0].exe is not None and victims[0].exe.deleted
    assert victims[0].exe.inode == reference.disk.reference.files["/usr/bin/sleep"].inode
    # only that: the file was listed and it is the same inode; and the ELF scan is quiet on this boot
    assert kinds(report.findings) == [(DELETED_EXECUTABLE, "/usr/bin/sleep")], [f.describe() for f in report.findings]
    assert f"pid {victims[0].pid} (sleep)" in (report.findings[0].found or "")


def test_glibc_guest_with_shared_libraries_leaves_no_unlisted_elf_page(
    reference: Reference, python_guest: Guest, libvirt_env: LibvirtEnv
) -> None:
    """No false positives where dynamic linking puts many ELF pages in memory: the python guest's init runs
    python3 (libpython, libc, ld.so, extension modules) before its marker; those pages stay in memory."""
    manifest = manifest_for(python_guest)

    disk = root_disk_facts(python_guest, manifest)
    dom = start(libvirt_env, libvirt_env.define_guest("glibc", python_guest), python_guest)
    report = inspect_guest(libvirt_env, dom.name(), python_guest, manifest, reference.workdir, disk)
    assert processes(report)[1].exe is not None and processes(report)[1].exe.path == "/usr/bin/busybox"
    assert report.elf_pages is not None
    file_pages = [p for p in report.elf_pages if not p.in_kernel_image]
    assert len({p.sha256 for p in file_pages}) >= 3, [p.describe() for p in report.elf_pages]
    assert report.findings == [], [f.describe() for f in report.findings]


MEMFD_LAUNCHER = (
    "import os; "
    "fd = os.memfd_create('hgt-fileless'); "
    "os.write(fd, open('/usr/bin/busybox', 'rb').read()); "
    "os.execve(f'/proc/self/fd/{fd}', ['busybox-fileless', 'sleep', '86400'], {})"
)


def test_fileless_program_run_from_memfd_is_unknown_and_deleted(
    reference: Reference, python_guest: Guest, libvirt_env: LibvirtEnv
) -> None:
    """A program that never touches a filesystem (memfd_create + execve of /proc/self/fd/N), started in the
    real root (chroot from the initramfs) with the guest's own python3."""
    manifest = manifest_for(python_guest)
    initrd = build_initrd(
        python_guest.kernel_version,
        libvirt_env.path("memfd-initrd.img"),
        files={},
        before_switch=(
            "mount -t proc proc /newroot/proc\n"
            # PYTHONHASHSEED: this early the kernel's CRNG may not be ready, and the chroot has no /dev/urandom
            f'PYTHONHASHSEED=0 chroot /newroot /usr/bin/python3 -c "{MEMFD_LAUNCHER}" </dev/null >/dev/null 2>&1 &\n'
            "sleep 2\n"
        ),
    )
    dom = start(libvirt_env, libvirt_env.define_guest("memfd", python_guest, initrd=initrd), python_guest)
    report = inspect_guest(libvirt_env, dom.name(), python_guest, manifest, reference.workdir, None)
    fileless = [p for p in processes(report).values() if p.exe is not None and "memfd:" in p.exe.path]
    assert len(fileless) == 1, [p.to_json() for p in processes(report).values() if not p.kernel_thread]
    exe = fileless[0].exe
    assert exe is not None and exe.path == "//detached/memfd:hgt-fileless" and exe.deleted
    # without a disk reference the ELF scan cannot run, and says so
    assert sorted(kinds(report.findings)) == sorted(
        [(UNKNOWN_PROCESS, exe.path), (DELETED_EXECUTABLE, exe.path), (CHECK_UNAVAILABLE, "memory:elf-scan")]
    )


# Sends four datagrams holding the first 3000 bytes of busybox with its ELF padding byte changed, and leaves
# them queued: each is copied into a kernel slab object (kmalloc-4k: page-aligned) and nowhere else
SLAB_SENDER = (
    "import os, socket, time; "
    "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM); "
    "data = bytearray(open('/usr/bin/busybox', 'rb').read(3000)); data[9] = 0x48; "
    "[a.send(data) for _ in range(4)]; "
    "del data; os.write(3, b'ok\\n'); os.close(3); time.sleep(86400)"
)


def test_an_elf_header_in_a_kernel_slab_object_is_not_a_finding(
    reference: Reference, python_guest: Guest, libvirt_env: LibvirtEnv
) -> None:
    """A slab page is kernel data, never code a process runs, and keeps stale bytes where its objects are free
    (the Debian guest's false `unlisted-elf-in-memory`: a kmalloc slab page that was a library's first page
    in the page cache). Here the guest's python3 puts an ELF header at the start of slab pages on purpose;
    the guest kernel's own page array says they are slab, and they are not judged."""
    from hostguard.host.libvirt import qemu_monitor_hmp
    from hostguard.memory.live import live_guest

    manifest = manifest_for(python_guest)
    disk = root_disk_facts(python_guest, manifest)
    initrd = build_initrd(
        python_guest.kernel_version,
        libvirt_env.path("slab-initrd.img"),
        files={},
        before_switch=(
            "mount -t proc proc /newroot/proc\n"
            "busybox mkfifo /sent\n"
            f'PYTHONHASHSEED=0 chroot /newroot /usr/bin/python3 -c "{SLAB_SENDER}" </dev/null >/dev/null 2>&1 \\\n'
            "  3>/sent &\n"
            'read -r sent </sent; [ "$sent" = ok ] || fail "the datagrams were not sent"\n'
        ),
    )
    dom = start(libvirt_env, libvirt_env.define_guest("slab", python_guest, initrd=initrd), python_guest)
    report = inspect_guest(libvirt_env, dom.name(), python_guest, manifest, reference.workdir, disk)
    assert report.elf_pages is not None
    live = live_guest(dom, lambda command: qemu_monitor_hmp(dom, command))
    ram = live.ram
    ours = [p for p in report.elf_pages if ram.read(p.address, 16)[9] == 0x48]
    assert len(ours) == 4, [p.describe() for p in report.elf_pages if p.use]
    assert {p.use for p in ours} == {"slab"}
    assert report.findings == [], [f.describe() for f in report.findings]

    # The other use skipped, free, read from the same real page array: pages this guest has never touched
    # since it booted (QEMU never mapped them) are free in its allocator.
    assert live.info is not None
    facts = kernelmod.load_facts(python_guest.kernel, live.info, reference.workdir / "kernels")
    untouched: list[int] = []
    for r in ram.ranges:
        end = 0
        for offset, length in ram.present_runs(r):  # runs of pages QEMU has mapped
            if offset > end and r.gpa + end >= 16 << 20:  # a gap: up to 32 of its pages, spread over it
                step = max(4096, (offset - end) // 32 // 4096 * 4096)
                untouched += range(r.gpa + end, r.gpa + offset, step)[:32]
            end = offset + length
    assert len(untouched) >= 16, untouched
    uses = structpage.page_uses(ram.read, live.info, untouched[:256], ram.end, facts.symbols.get("vmemmap_base"))
    assert set(uses.values()) == {"free"}, uses


def test_check_config_reports_and_fixes_a_domain_without_vmcoreinfo(
    busybox_guest: Guest, libvirt_env: LibvirtEnv
) -> None:
    xml = libvirt_env.domain_xml("novmci", busybox_guest, disk_path=libvirt_env.path("none.qcow2"))
    xml = xml.replace("<vmcoreinfo state='on'/>", "")
    name = libvirt_env.domain_name("novmci")
    libvirt_env.names.append(name)
    conn = libvirt_env.connection()
    conn.defineXML(xml)

    before = check_config(conn, name)
    assert not before.ok and "vmcoreinfo" in before.problems[0] and not before.fixed
    assert "<vmcoreinfo" not in conn.lookupByName(name).XMLDesc(0)

    fixed = check_config(conn, name, fix=True)
    assert fixed.ok and fixed.fixed and fixed.vmcoreinfo
    assert "<vmcoreinfo state='on'/>" in conn.lookupByName(name).XMLDesc(0)
    assert check_config(conn, name).ok


def test_guest_with_more_than_4_gib_maps_ram_above_the_pci_hole(busybox_guest: Guest, libvirt_env: LibvirtEnv) -> None:
    """6 GiB: QEMU splits RAM below 3 GiB and above 4 GiB (pc-i440fx). The kernel allocates top-down, so its
    VMCOREINFO and most of its objects live above 4 GiB: the in-place read sees what the dump sees."""
    from hostguard.host.libvirt import qemu_monitor_hmp
    from hostguard.memory.live import live_guest

    manifest = manifest_for(busybox_guest)
    disk = root_disk_facts(busybox_guest, manifest)
    dom = start(libvirt_env, libvirt_env.define_guest("big", busybox_guest, memory_mib=6144), busybox_guest)
    work = Path(tempfile.mkdtemp(prefix="hgt-memory-big-"))
    try:

        def check(method: str) -> MemoryReport:
            return retrying(
                libvirt_env,
                lambda: inspect_domain_memory(
                    dom.name(),
                    manifest,
                    busybox_guest.kernel,
                    work,
                    conn=libvirt_env.connection(),
                    initrd_path=busybox_guest.initrd,
                    disk=disk,
                    method=method,
                ),
            )

        in_place = check("in-place")
        guest = live_guest(dom, lambda c: qemu_monitor_hmp(dom, c))
        assert any(r.gpa >= 4 << 30 for r in guest.ram.ranges)
        assert sum(r.size for r in guest.ram.ranges) == 6 << 30
        assert any(a >= 4 << 30 for a in guest.info_at), [hex(a) for a in guest.info_at]
        assert in_place.findings == [], [f.describe() for f in in_place.findings]
        dumped = check("dump")
        assert dumped.findings == [] and dumped.dump_bytes >= 6 << 30
        assert in_place.snapshot is not None and dumped.snapshot is not None
        assert in_place.snapshot.modules == dumped.snapshot.modules
        key = {(p.pid, p.comm, p.exe.path if p.exe else None) for p in in_place.snapshot.processes}
        assert key == {(p.pid, p.comm, p.exe.path if p.exe else None) for p in dumped.snapshot.processes}
        again = check("in-place")  # VMCOREINFO's place is known now: a periodic check reads a few MiB
        assert again.findings == [] and again.bytes_read < 64 << 20 and again.dump_bytes == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
import libvirt
from pathlib import Path
from hostguard.memory.hold import held_for_walk
dom = libvirt.open("qemu:///system").lookupByName({name!r})
with held_for_walk(dom, Path({markers!r}), limit=3600):
    print("held", flush=True)
    time.sleep(3600)
"""


def test_a_check_killed_while_the_guest_is_held_leaves_it_paused_only_until_the_next_check(
    reference: Reference, tmp_path: Path
) -> None:
    """SIGKILL the checking process while it holds the guest paused: the marker it wrote stays, and the next
    check (a restarted daemon) resumes the guest before anything else."""
    import libvirt

    markers = tmp_path / "holds"
    script = HOLDER.format(repo=str(Path(__file__).resolve().parents[2]), name=reference.name, markers=str(markers))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"held"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    dom = reference.domain
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED and len(list(markers.iterdir())) == 1
    report = retrying(
        reference.env,
        lambda: inspect_domain_memory(
            reference.name,
            reference.manifest,
            reference.guest.kernel,
            reference.workdir,
            conn=reference.env.connection(),
            initrd_path=reference.guest.initrd,
            disk=reference.disk,
            marker_dir=markers,
        ),
    )
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and list(markers.iterdir()) == []
    assert report.method == "in-place" and report.findings == [], [f.describe() for f in report.findings]


def test_ram_that_cannot_be_placed_falls_back_to_a_dump_and_says_so(
    reference: Reference, libvirt_env: LibvirtEnv
) -> None:
    """Two NUMA cells of the same size: two RAM blocks QEMU maps with the same size, which /proc/<pid>/maps
    cannot tell apart. The check still runs, through a whole-RAM dump, and the verdict notes it."""
    guest = reference.guest
    disk = libvirt_env.copy_disk(guest.root_qcow2, "numa-root.qcow2")
    dom = start(libvirt_env, libvirt_env.define_numa_guest("numa", guest, disk_path=disk), guest)
    report = inspect(libvirt_env, dom.name(), reference)
    assert report.method == "dump-fallback" and report.dump_bytes >= 256 << 20
    assert kinds(report.findings) == [(CHECK_UNAVAILABLE, "memory:in-place")], [f.describe() for f in report.findings]
    assert "whole-RAM dump" in (report.findings[0].found or "") and "mappings of that size" in (
        report.findings[0].found or ""
    )
    assert processes(report)[1].exe is not None
