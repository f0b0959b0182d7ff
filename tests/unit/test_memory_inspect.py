"""inspect_dump's decisions on synthetic inputs: trusted files must be the manifest's, a dump that cannot be
analysed gives "unavailable" findings (never a crash), another kernel than the listed one is a finding."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hostguard.errors import DigestMismatchError, HostguardError
from hostguard.memory.inspect import Inputs, inspect_dump, verified_file
from hostguard.memory.judge import ELF_SCAN_PATH, MEMORY_PATH
from hostguard.memory.kernel import file_sha256
from hostguard.signed.findings import CHECK_UNAVAILABLE, UNKNOWN_KERNEL
from hostguard.signed.manifest import Blob, BootFiles, DiskEntry, FileEntry, ImageId, Manifest
from tests.unit.memory_fakes import elf_core
from tests.unit.test_memory_kernel import BUILD_ID, KASLR, bzimage, make_vmlinux


def manifest(kernel: Path | None, extra: tuple[FileEntry, ...] = ()) -> Manifest:
    now = datetime.now(UTC)
    boot = BootFiles(Blob(file_sha256(kernel), kernel.stat().st_size)) if kernel else None
    return Manifest(ImageId("t", 1), now, now + timedelta(days=1), (DiskEntry("0" * 64, 1),), extra, boot)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    image, _ = make_vmlinux(btf=None)
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(gzip.compress(image)))
    return path


def test_kernel_and_initrd_must_be_the_manifests(tmp_path: Path, kernel: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"not the kernel")
    with pytest.raises(DigestMismatchError, match="is not the kernel the manifest lists"):
        verified_file(manifest(kernel), other, "kernel")
    assert verified_file(manifest(kernel), kernel, "kernel") == file_sha256(kernel)
    # or a kernel the image itself carries under /boot
    listed = FileEntry("/boot/vmlinuz-6.1.0", file_sha256(other), 14, 0o644, 0, 0)
    assert verified_file(manifest(None, (listed,)), other, "kernel")
    with pytest.raises(DigestMismatchError):
        inspect_dump(tmp_path / "core", Inputs(manifest(kernel), other), tmp_path)


def test_dump_without_vmcoreinfo_is_unavailable(tmp_path: Path, kernel: Path) -> None:
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, bytes(16384))]))
    report = inspect_dump(dump, Inputs(manifest(kernel), kernel), tmp_path / "work")
    assert report.snapshot is None and report.unavailable and "no VMCOREINFO" in report.unavailable
    assert [(f.kind, f.path) for f in report.findings] == [
        (CHECK_UNAVAILABLE, MEMORY_PATH),
        (CHECK_UNAVAILABLE, ELF_SCAN_PATH),
    ]


def test_another_kernel_than_the_listed_one_is_a_finding(tmp_path: Path, kernel: Path) -> None:
    note = f"OSRELEASE=6.1.0-evil\nBUILD-ID={'ab' * 20}\nKERNELOFFSET={KASLR:x}\nNUMBER(phys_base)=0\n".encode()
    dump = tmp_path / "core"
    dump.write_bytes(elf_core([(0, bytes(16384))], [(b"VMCOREINFO", 0, note)]))
    report = inspect_dump(dump, Inputs(manifest(kernel), kernel), tmp_path / "work")
    kinds = [(f.kind, f.path) for f in report.findings]
    assert (UNKNOWN_KERNEL, "kernel") in kinds
    mismatch = next(f for f in report.findings if f.kind == UNKNOWN_KERNEL)
    assert mismatch.expected == f"build id {BUILD_ID.hex()}" and mismatch.found == f"build id {'ab' * 20}"


def test_garbage_dump_is_unavailable_not_a_crash(tmp_path: Path, kernel: Path) -> None:
    dump = tmp_path / "core"
    dump.write_bytes(b"\x7fELF\x02\x01" + b"\xff" * 4000)
    report = inspect_dump(dump, Inputs(manifest(kernel), kernel), tmp_path / "work")
    assert report.snapshot is None and report.unavailable and "cannot analyse" in report.unavailable


def test_missing_dump_is_a_hostguard_error(tmp_path: Path, kernel: Path) -> None:
    with pytest.raises(HostguardError, match="No such file"):
        inspect_dump(tmp_path / "absent.core", Inputs(manifest(kernel), kernel), tmp_path / "work")
