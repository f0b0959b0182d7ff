"""Walk the guest kernel's own data structures: the task list, executables' paths, the module list.

Everything here reads guest memory, which the guest controls: each list walk is bounded and detects cycles
and broken back-links, each string has a length cap, each path a depth cap. Damage is reported as an
anomaly (the lists may then be incomplete), never as an exception that loses what was already read.
Memory access goes through `GuestMemory.read(virtual_address, size)`, so tests can use a fake.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Protocol

from hostguard.errors import FormatError
from hostguard.memory.model import (
    EXITING,
    KERNEL_THREAD,
    NO_EXECUTABLE,
    UNREADABLE,
    Executable,
    KernelModule,
    Process,
)
from hostguard.record import Record
from hostguard.signed.manifest import encode_path

PAGE = 4096
PF_KTHREAD = 0x00200000
MINORBITS = 20
MODULE_STATES = {0: "live", 1: "coming", 2: "going", 3: "unformed"}
DETACHED_PREFIX = "//detached"  # an executable on a mount that is no longer in the mount tree


class MemoryFault(Exception):
    """A guest virtual address could not be read."""


class GuestMemory(Protocol):
    def read(self, address: int, size: int) -> bytes:
        """`size` bytes at guest virtual `address`, or `MemoryFault`."""
        ...


class WalkLimits(Record):
    max_tasks: int = 1 << 17
    max_modules: int = 8192
    max_path_components: int = 256
    max_path_bytes: int = 4096
    max_name_bytes: int = 255  # NAME_MAX
    max_mount_depth: int = 64
    max_fstype_bytes: int = 64


class Walker:
    """Reads with `mem`, interprets with `layout` (offsets from BTF: see hostguard.memory.kernel)."""

    def __init__(self, mem: GuestMemory, layout: Mapping[str, int], limits: WalkLimits | None = None) -> None:
        self.mem = mem
        self.layout = layout
        self.limits = limits or WalkLimits()
        self.anomalies: list[str] = []

    # --- primitives ----------------------------------------------------------------------------------------

    def off(self, name: str) -> int:
        try:
            return self.layout[name]
        except KeyError:
            raise FormatError(f"kernel layout lacks {name}") from None

    def u64(self, address: int) -> int:
        return int(struct.unpack("<Q", self._read(address, 8))[0])

    def u32(self, address: int) -> int:
        return int(struct.unpack("<I", self._read(address, 4))[0])

    def s32(self, address: int) -> int:
        return int(struct.unpack("<i", self._read(address, 4))[0])

    def _read(self, address: int, size: int) -> bytes:
        if not 0 < address < 1 << 64 or address + size > 1 << 64:
            raise MemoryFault(f"bad address {address:#x}")
        data = self.mem.read(address, size)
        if len(data) != size:
            raise MemoryFault(f"short read at {address:#x}")
        return data

    def cstring(self, address: int, limit: int) -> bytes:
        """A NUL-terminated string of at most `limit` bytes, read page by page: a short string near the end
        of a page must not fault on the (possibly unmapped) page after it."""
        out = b""
        while len(out) < limit:
            size = min(limit - len(out), PAGE - (address + len(out)) % PAGE)
            chunk = self._read(address + len(out), size)
            end = chunk.find(b"\0")
            if end >= 0:
                return out + chunk[:end]
            out += chunk
        return out

    # --- lists ---------------------------------------------------------------------------------------------

    def list_nodes(self, head: int, limit: int, what: str) -> list[int]:
        """Addresses of the list_head nodes after `head`, bounded, cycle-checked, back-links verified."""
        nxt, prv = self.off("list_head.next"), self.off("list_head.prev")
        nodes: list[int] = []
        seen = {head}
        prev = head
        try:
            node = self.u64(head + nxt)
            while node != head:
                if len(nodes) >= limit:
                    self.anomalies.append(f"{what} has more than {limit} entries: stopped there")
                    break
                if node in seen:
                    self.anomalies.append(f"{what} has a cycle at {node:#x}")
                    break
                seen.add(node)
                if self.u64(node + prv) != prev:
                    self.anomalies.append(f"{what} is inconsistent at {node:#x}: its prev link does not point back")
                nodes.append(node)
                prev = node
                node = self.u64(node + nxt)
        except MemoryFault as err:
            self.anomalies.append(f"{what} is broken: {err}")
        return nodes

    # --- processes -----------------------------------------------------------------------------------------

    def processes(self, init_task: int) -> list[Process]:
        tasks = self.off("task_struct.tasks")
        out = []
        for node in self.list_nodes(init_task + tasks, self.limits.max_tasks, "task list"):
            try:
                out.append(self.process(node - tasks))
            except MemoryFault as err:
                self.anomalies.append(f"task at {node - tasks:#x} is unreadable: {err}")
        return out

    def process(self, task: int) -> Process:
        pid = self.s32(task + self.off("task_struct.pid"))
        tgid = self.s32(task + self.off("task_struct.tgid"))
        comm_raw = self._read(task + self.off("task_struct.comm"), self.off("len:task_struct.comm"))
        comm = printable(comm_raw.split(b"\0", 1)[0])
        flags = self.u32(task + self.off("task_struct.flags"))
        ppid = None
        try:
            parent = self.u64(task + self.off("task_struct.real_parent"))
            ppid = self.s32(parent + self.off("task_struct.tgid")) if parent else None
        except MemoryFault:
            ppid = None
        if flags & PF_KTHREAD:
            return Process(pid, tgid, ppid, comm, True, None, None, KERNEL_THREAD)
        mm = self.u64(task + self.off("task_struct.mm"))
        if not mm:
            return Process(pid, tgid, ppid, comm, False, None, "no address space (exiting or a zombie)", EXITING)
        try:
            exe_file = self.u64(mm + self.off("mm_struct.exe_file"))
            if not exe_file:
                return Process(pid, tgid, ppid, comm, False, None, "no executable file", NO_EXECUTABLE)
            return Process(pid, tgid, ppid, comm, False, self.executable(exe_file))
        except (MemoryFault, FormatError) as err:
            why = err.message if isinstance(err, FormatError) else str(err)
            return Process(pid, tgid, ppid, comm, False, None, f"executable unreadable: {why}", UNREADABLE)

    def executable(self, file: int) -> Executable:
        f_path = file + self.off("file.f_path")
        vfsmount = self.u64(f_path + self.off("path.mnt"))
        dentry = self.u64(f_path + self.off("path.dentry"))
        inode = self.u64(dentry + self.off("dentry.d_inode"))
        if not inode:
            raise FormatError("the executable's dentry has no inode")
        ino = self.u64(inode + self.off("inode.i_ino"))
        nlink = self.u32(inode + self.off("inode.__i_nlink"))
        sb = self.u64(inode + self.off("inode.i_sb"))
        dev = self.u32(sb + self.off("super_block.s_dev"))
        fs_type = self.u64(sb + self.off("super_block.s_type"))
        fstype_name = self.u64(fs_type + self.off("file_system_type.name"))
        fstype = printable(self.cstring(fstype_name, self.limits.max_fstype_bytes))
        uuid = self._read(sb + self.off("super_block.s_uuid"), 16)
        hash_pprev = self.u64(dentry + self.off("dentry.d_hash") + self.off("hlist_bl_node.pprev"))
        is_root = self.u64(dentry + self.off("dentry.d_parent")) == dentry
        path, attached = self.path(vfsmount, dentry)
        text = encode_path(path)
        return Executable(
            path=text if attached else DETACHED_PREFIX + text,
            inode=ino,
            device=f"{dev >> MINORBITS}:{dev & ((1 << MINORBITS) - 1)}",
            fstype=fstype,
            fs_uuid=None if not any(uuid) else _uuid_text(uuid),
            deleted=(hash_pprev == 0 and not is_root) or nlink == 0,
            nlink=nlink,
        )

    def path(self, vfsmount: int, dentry: int) -> tuple[bytes, bool]:
        """Raw path of `dentry` on `vfsmount` from the root of the mount tree, as the kernel's prepend_path
        builds it, and whether the walk ended at a mount tree root (False: the mount was detached)."""
        lim = self.limits
        mount = vfsmount - self.off("mount.mnt")
        mnt_root_off = self.off("mount.mnt") + self.off("vfsmount.mnt_root")
        parts: list[bytes] = []
        total = 0
        seen: set[tuple[int, int]] = set()
        hops = 0
        while True:
            if (mount, dentry) in seen:
                raise FormatError("dentry/mount chain has a cycle")
            seen.add((mount, dentry))
            if dentry == self.u64(mount + mnt_root_off):
                parent = self.u64(mount + self.off("mount.mnt_parent"))
                if parent in (mount, 0):
                    return b"/" + b"/".join(reversed(parts)), parent == mount
                hops += 1
                if hops > lim.max_mount_depth:
                    raise FormatError(f"mounts nested deeper than {lim.max_mount_depth}")
                dentry = self.u64(mount + self.off("mount.mnt_mountpoint"))
                mount = parent
                continue
            up = self.u64(dentry + self.off("dentry.d_parent"))
            if up == dentry:
                # The top of a dentry tree that is not its mount's root: a pseudo file (memfd_create, an
                # anonymous shmem file: d_path shows "/memfd:NAME (deleted)") or a path outside its mount
                # (d_path's "unreachable" case). Name what is known.
                if not parts:
                    parts.append(self.name(dentry))
                return b"/" + b"/".join(reversed(parts)), False
            parts.append(self.name(dentry))
            total += len(parts[-1]) + 1
            if len(parts) > lim.max_path_components or total > lim.max_path_bytes:
                limit = f"{lim.max_path_components} components or {lim.max_path_bytes} bytes"
                raise FormatError(f"path longer than {limit}")
            dentry = up

    def name(self, dentry: int) -> bytes:
        qstr = dentry + self.off("dentry.d_name")
        length = self.u32(qstr + self.off("qstr.len"))
        if not 0 < length <= self.limits.max_name_bytes:
            raise FormatError(f"file name length {length} out of range")
        name = self._read(self.u64(qstr + self.off("qstr.name")), length)
        if b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FormatError("file name with '/' or NUL, or . or ..")
        return name

    # --- modules -------------------------------------------------------------------------------------------

    def modules(self, modules_head: int) -> list[KernelModule]:
        list_off = self.off("module.list")
        out = []
        for node in self.list_nodes(modules_head, self.limits.max_modules, "module list"):
            module = node - list_off
            try:
                raw = self._read(module + self.off("module.name"), self.off("len:module.name"))
                state = self.u32(module + self.off("module.state"))
            except MemoryFault as err:
                self.anomalies.append(f"module at {module:#x} is unreadable: {err}")
                continue
            name = raw.split(b"\0", 1)[0]
            text = printable(name)
            if not name or not all(0x21 <= c < 0x7F and c != 0x2F for c in name):
                self.anomalies.append(f"module at {module:#x} has a malformed name {text[:80]!r}")
            out.append(KernelModule(text, MODULE_STATES.get(state, str(state))))
        return out

    def release(self, init_uts_ns: int) -> str:
        address = init_uts_ns + self.off("uts_namespace.name") + self.off("new_utsname.release")
        return printable(self.cstring(address, 65))


def printable(raw: bytes) -> str:
    """Guest bytes as one line of text: UTF-8 where valid, everything else (controls included) as \\xNN."""
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
