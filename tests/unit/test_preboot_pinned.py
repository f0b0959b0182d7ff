"""hostguard.preboot.pinned: the files QEMU gets are the files `prepare` verified (ADR 0018). A real process
stands in for QEMU (it opens the disk by path, as QEMU does); the swap is a rename, as the attacker does it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostguard.domain.record import DomainRecord, RecordedDisk, RecordedFile, RecordedLayer
from hostguard.host.config import Config
from hostguard.host.statedir import save_domain_record
from hostguard.preboot.pinned import check_pinned, held_files, held_refusal, paths_refusal, qemu_pid

Starter = Callable[[], "subprocess.Popen[bytes]"]
UUID = "5a1d8c7e-33a1-4c7b-9e0f-1d2c3b4a5f60"
OPENER = (
    "import os, sys, time\nfds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]\n"
    "print('open', flush=True)\ntime.sleep(120)\n"
)


class Files:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.top, self.base, self.kernel = tmp / "top.qcow2", tmp / "base.qcow2", tmp / "vmlinuz"
        for p in (self.top, self.base, self.kernel):
            p.write_bytes(p.name.encode())
        self.state = tmp / "state"
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()

    def record(self) -> DomainRecord:
        def layer(p: Path, role: str) -> RecordedLayer:
            st = os.stat(p)
            return RecordedLayer(str(p), "qcow2", st.st_dev, st.st_ino, role)

        st = os.stat(self.kernel)
        disk = RecordedDisk("vda", "e.hgsig", (layer(self.top, "overlay"), layer(self.base, "signed")))
        return DomainRecord("web1", UUID, disks=(disk,), boot=(RecordedFile(str(self.kernel), st.st_dev, st.st_ino),))

    def swap(self, path: Path) -> None:
        evil = self.tmp / "evil"
        evil.write_bytes(b"unsigned")
        os.rename(evil, path)  # the verified inode is gone from the path; a new one takes its name

    def config(self, mode: str = "enforce") -> Config:
        doc = {"trust": {"dir": str(self.tmp / "trust")}, "state": {"dir": str(self.state)}, "policy": {"mode": mode}}
        return Config(doc, self.tmp / "hostguard.toml")

    def xml(self) -> bytes:
        return (
            f"<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices/></domain>"
        ).encode()


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@pytest.fixture
def qemu(files: Files) -> Iterator[Starter]:
    """Started by each test after its swap, like QEMU after `prepare`: holds top and base open by path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", OPENER, str(files.top), str(files.base)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
        (files.run_dir / "web1.pid").write_text(f"{proc.pid}\n")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_unchanged_paths_and_held_files_pass(files: Files, qemu: Starter) -> None:
    record = files.record()
    proc = qemu()
    assert paths_refusal(record) is None
    assert held_refusal(record, held_files(proc.pid)) is None


def test_a_disk_renamed_over_after_prepare_is_refused_at_start_before_qemu_exists(files: Files) -> None:
    record = files.record()
    files.swap(files.base)
    why = paths_refusal(record)
    assert why is not None and f"{files.base} was replaced after it was verified" in why


def test_a_kernel_renamed_over_is_refused(files: Files) -> None:
    record = files.record()
    files.swap(files.kernel)
    assert f"{files.kernel} was replaced" in (paths_refusal(record) or "")


def test_a_disk_swapped_before_qemu_opened_it_is_found_among_the_files_qemu_holds(files: Files, qemu: Starter) -> None:
    record = files.record()
    files.swap(files.base)
    proc = qemu()
    why = held_refusal(record, held_files(proc.pid))
    assert why is not None and f"QEMU opened {files.base} as device/inode" in why and "swapped after the check" in why


def test_a_swap_and_swap_back_still_leaves_qemu_without_the_verified_file(files: Files, qemu: Starter) -> None:
    record = files.record()
    keep = files.tmp / "kept"
    os.link(files.top, keep)
    files.swap(files.top)
    proc = qemu()
    os.rename(keep, files.top)  # the verified file is back under its name: only the held descriptors tell
    assert paths_refusal(record) is None
    why = held_refusal(record, held_files(proc.pid))
    assert why is not None and f"QEMU does not hold the verified {files.top}" in why


def test_started_kills_qemu_holding_a_swapped_disk(files: Files, qemu: Starter) -> None:
    save_domain_record(files.state, files.record())
    files.swap(files.top)
    proc = qemu()
    why = check_pinned(files.config(), files.xml(), "web1", "started", files.run_dir)
    assert why is not None and why.endswith("; QEMU was killed") and "\n" not in why
    assert proc.wait(timeout=10) == -9


def test_started_in_audit_mode_reports_but_kills_nothing(files: Files, qemu: Starter) -> None:
    save_domain_record(files.state, files.record())
    files.swap(files.top)
    proc = qemu()
    why = check_pinned(files.config("audit"), files.xml(), "web1", "started", files.run_dir)
    assert why is not None and "killed" not in why
    time.sleep(0.2)
    assert proc.poll() is None


def test_started_passes_for_the_verified_files_and_fails_closed_without_a_record_or_pid(
    files: Files, qemu: Starter
) -> None:
    config = files.config()
    assert check_pinned(config, files.xml(), "web1", "start", files.run_dir) == (
        "no pre-boot record of this start: the verified files are unknown"
    )
    save_domain_record(files.state, files.record())
    assert check_pinned(config, files.xml(), "web1", "start", files.run_dir) is None
    assert "cannot see the files QEMU holds" in (
        check_pinned(config, files.xml(), "web1", "started", files.run_dir) or ""
    )
    qemu()
    assert check_pinned(config, files.xml(), "web1", "started", files.run_dir) is None


def test_the_pid_file_must_hold_a_plausible_pid(files: Files) -> None:
    (files.run_dir / "web1.pid").write_text("1\n")
    with pytest.raises(ValueError):
        qemu_pid("web1", files.run_dir)
