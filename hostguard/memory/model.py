"""What a memory inspection found, as plain data (pure: no I/O, no drgn). Paths use the manifest encoding."""

from __future__ import annotations

from typing import Any

from hostguard.record import Record, field


class Executable(Record):
    """A process's executable file as the guest kernel knows it (mm->exe_file)."""

    path: str  # full path from the mount namespace root, manifest encoding (hostguard.signed.manifest.encode_path)
    inode: int
    device: str  # "major:minor" of the superblock
    fstype: str  # "ext4", "tmpfs", "rootfs", ...
    fs_uuid: str | None  # lower-case with hyphens, None when the filesystem has none (all zero)
    deleted: bool  # unlinked since it was opened (d_path would append " (deleted)")
    nlink: int

    def describe(self) -> str:
        gone = " (deleted)" if self.deleted else ""
        return f"{self.path}{gone} inode {self.inode} on {self.fstype} {self.device}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "inode": self.inode,
            "device": self.device,
            "fstype": self.fstype,
            "fs_uuid": self.fs_uuid,
            "deleted": self.deleted,
            "nlink": self.nlink,
        }


# Process.status
RUNNING = "running"  # a user process with a readable executable
KERNEL_THREAD = "kernel-thread"
EXITING = "exiting"  # no address space any more (exiting, or a zombie)
NO_EXECUTABLE = "no-executable"  # an address space without an executable file
UNREADABLE = "unreadable"  # the executable's kernel structures could not be read


class Process(Record):
    pid: int
    tgid: int
    ppid: int | None
    comm: str
    kernel_thread: bool
    exe: Executable | None  # None unless status is RUNNING
    problem: str | None = None  # why there is no executable
    status: str = RUNNING

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm})"

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "tgid": self.tgid,
            "ppid": self.ppid,
            "comm": self.comm,
            "kernel_thread": self.kernel_thread,
            "exe": self.exe.to_json() if self.exe else None,
            "problem": self.problem,
            "status": self.status,
        }


class KernelModule(Record):
    name: str
    state: str  # live, coming, going, unformed, or the raw number

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state}


# What the guest kernel uses a page for, by its `struct page` (hostguard.memory.structpage)
PAGE_SLAB, PAGE_FREE, PAGE_IN_USE, PAGE_UNKNOWN = "slab", "free", "in use", ""
NOT_IN_USE = frozenset({PAGE_SLAB, PAGE_FREE})  # no process can run code from these: the scan does not judge them


class ElfPage(Record):
    """A page of guest physical memory that starts with the header of an executable or shared object."""

    address: int  # guest physical address
    e_type: str  # "exec" or "dyn"
    machine: int
    elf_class: int  # 1: 32-bit, 2: 64-bit
    sha256: str  # of the whole page
    in_kernel_image: bool
    use: str = PAGE_UNKNOWN  # looked up only for pages that are no known file's

    def describe(self) -> str:
        where = " in the kernel image" if self.in_kernel_image else ""
        used = f" ({self.use} page)" if self.use else ""
        return f"ELF {self.e_type} page at {self.address:#x}{where}{used} sha256 {self.sha256[:16]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "e_type": self.e_type,
            "machine": self.machine,
            "class": self.elf_class,
            "sha256": self.sha256,
            "in_kernel_image": self.in_kernel_image,
            "use": self.use or None,
        }


class MemorySnapshot(Record):
    """The analysis of one dump. `anomalies` are signs of damage or tampering met while walking guest data
    (a broken or cyclic list, a limit reached): the lists may then be incomplete."""

    kernel_release: str
    build_id: str | None
    vmcoreinfo_source: str
    btf_source: str  # "kernel-file" or "guest-memory"
    symbols_source: str  # "kernel-file" or "guest-memory"
    processes: tuple[Process, ...]
    modules: tuple[KernelModule, ...]
    anomalies: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel_release": self.kernel_release,
            "build_id": self.build_id,
            "vmcoreinfo_source": self.vmcoreinfo_source,
            "btf_source": self.btf_source,
            "symbols_source": self.symbols_source,
            "processes": [p.to_json() for p in self.processes],
            "modules": [m.to_json() for m in self.modules],
            "anomalies": list(self.anomalies),
            "warnings": list(self.warnings),
        }
