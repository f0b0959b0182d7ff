"""The kernel-structure walker on synthetic guest memory: what it reads, and how it survives hostile data."""

from __future__ import annotations

import pytest

from hostguard.memory.model import EXITING, KERNEL_THREAD, NO_EXECUTABLE, RUNNING, UNREADABLE
from hostguard.memory.walk import DETACHED_PREFIX, PF_KTHREAD, MemoryFault, Walker, WalkLimits
from tests.unit.memory_fakes import FakeMemory

LAYOUT = {
    "list_head.next": 0,
    "list_head.prev": 8,
    "task_struct.tasks": 0x10,
    "task_struct.flags": 0x4,
    "task_struct.pid": 0x30,
    "task_struct.tgid": 0x34,
    "task_struct.comm": 0x40,
    "len:task_struct.comm": 16,
    "task_struct.mm": 0x58,
    "task_struct.real_parent": 0x60,
    "mm_struct.exe_file": 0x20,
    "file.f_path": 0x10,
    "path.mnt": 0,
    "path.dentry": 8,
    "dentry.d_hash": 0x8,
    "hlist_bl_node.pprev": 8,
    "dentry.d_parent": 0x18,
    "dentry.d_name": 0x20,
    "qstr.len": 4,
    "qstr.name": 8,
    "dentry.d_inode": 0x30,
    "inode.i_sb": 0x28,
    "inode.i_ino": 0x40,
    "inode.__i_nlink": 0x48,
    "super_block.s_dev": 0x10,
    "super_block.s_type": 0x28,
    "super_block.s_uuid": 0x120,
    "file_system_type.name": 0,
    "mount.mnt_parent": 0x10,
    "mount.mnt_mountpoint": 0x18,
    "mount.mnt": 0x20,
    "vfsmount.mnt_root": 0,
    "module.state": 0,
    "module.list": 8,
    "module.name": 0x18,
    "len:module.name": 56,
    "uts_namespace.name": 0,
    "new_utsname.release": 130,
}
UUID = bytes(range(16))


class FakeKernel:
    """Allocates kernel objects laid out as LAYOUT says."""

    def __init__(self) -> None:
        self.mem = FakeMemory()
        m = self.mem
        self.init_task = m.alloc(0x100)
        self._list_init(self.init_task + 0x10)
        self.modules_head = m.alloc(16)
        self._list_init(self.modules_head)
        self.ext4 = self.superblock("ext4", (254 << 20) | 0, UUID)
        self.rootfs = self.superblock("rootfs", 1, bytes(16))
        # rootfs is the namespace root; ext4 is mounted on its root dentry (as after switch_root)
        self.rootfs_root = self.dentry(b"/", None, self.inode(1, 1, self.rootfs))
        self.rootfs_mnt = self.mount(self.rootfs_root, None, None)
        self.root = self.dentry(b"/", None, self.inode(2, 3, self.ext4))
        self.root_mnt = self.mount(self.root, self.rootfs_mnt, self.rootfs_root)

    def _list_init(self, head: int) -> None:
        self.mem.put(head, "QQ", head, head)

    def list_add_tail(self, head: int, node: int) -> None:
        prev = self.mem.read(head + 8, 8)
        last = int.from_bytes(prev, "little")
        self.mem.put(node, "QQ", head, last)
        self.mem.put(last, "Q", node)
        self.mem.put(head + 8, "Q", node)

    def superblock(self, fstype: str, dev: int, uuid: bytes) -> int:
        name = self.mem.alloc(32, fstype.encode() + b"\0")
        fs_type = self.mem.alloc(16)
        self.mem.put(fs_type, "Q", name)
        sb = self.mem.alloc(0x200)
        self.mem.put(sb + 0x10, "I", dev)
        self.mem.put(sb + 0x28, "Q", fs_type)
        self.mem.put_bytes(sb + 0x120, uuid)
        return sb

    def inode(self, ino: int, nlink: int, sb: int) -> int:
        inode = self.mem.alloc(0x80)
        self.mem.put(inode + 0x28, "Q", sb)
        self.mem.put(inode + 0x40, "Q", ino)
        self.mem.put(inode + 0x48, "I", nlink)
        return inode

    def dentry(self, name: bytes, parent: int | None, inode: int, *, hashed: bool = True) -> int:
        d = self.mem.alloc(0x40)
        text = self.mem.alloc(max(len(name), 1) + 1, name + b"\0")
        self.mem.put(d + 0x8 + 8, "Q", 0xDEAD if hashed else 0)
        self.mem.put(d + 0x18, "Q", parent if parent is not None else d)
        self.mem.put(d + 0x20 + 4, "I", len(name))
        self.mem.put(d + 0x20 + 8, "Q", text)
        self.mem.put(d + 0x30, "Q", inode)
        return d

    def mount(self, root: int, parent: int | None, mountpoint: int | None) -> int:
        mount = self.mem.alloc(0x100)
        self.mem.put(mount + 0x10, "Q", parent if parent is not None else mount)
        self.mem.put(mount + 0x18, "Q", mountpoint if mountpoint is not None else root)
        self.mem.put(mount + 0x20, "Q", root)
        return mount

    def path(
        self,
        *names: bytes,
        ino: int = 100,
        nlink: int = 1,
        sb: int | None = None,
        mnt: int | None = None,
        root: int | None = None,
        hashed: bool = True,
    ) -> tuple[int, int]:
        """(vfsmount, dentry) of a file at root/names..."""
        sb = sb or self.ext4
        parent = root or self.root
        for n in names[:-1]:
            parent = self.dentry(n, parent, self.inode(ino + 1000, 2, sb))
        d = self.dentry(names[-1], parent, self.inode(ino, nlink, sb), hashed=hashed)
        return (mnt or self.root_mnt) + 0x20, d

    def file(self, vfsmount: int, dentry: int) -> int:
        f = self.mem.alloc(0x40)
        self.mem.put(f + 0x10, "QQ", vfsmount, dentry)
        return f

    def task(
        self,
        pid: int,
        comm: bytes,
        *,
        exe: int | None = None,
        kthread: bool = False,
        mm: bool = True,
        parent: int | None = None,
    ) -> int:
        t = self.mem.alloc(0x100)
        self.mem.put(t + 0x4, "I", PF_KTHREAD if kthread else 0)
        self.mem.put(t + 0x30, "ii", pid, pid)
        self.mem.put_bytes(t + 0x40, comm[:16])
        self.mem.put(t + 0x60, "Q", parent or self.init_task)
        if not kthread and mm:
            mm_struct = self.mem.alloc(0x40)
            self.mem.put(mm_struct + 0x20, "Q", exe or 0)
            self.mem.put(t + 0x58, "Q", mm_struct)
        self.list_add_tail(self.init_task + 0x10, t + 0x10)
        return t

    def module(self, name: bytes, state: int = 0) -> int:
        m = self.mem.alloc(0x60)
        self.mem.put(m, "I", state)
        self.mem.put_bytes(m + 0x18, name)
        self.list_add_tail(self.modules_head, m + 8)
        return m

    def walker(self, limits: WalkLimits | None = None) -> Walker:
        return Walker(self.mem, LAYOUT, limits)


def test_processes_with_paths_across_mounts_inodes_and_filesystems() -> None:
    k = FakeKernel()
    busybox = k.file(*k.path(b"bin", b"busybox", ino=15, nlink=2))
    init = k.task(1, b"init", exe=busybox)
    k.task(2, b"kthreadd", kthread=True)
    k.task(108, b"sleep", exe=k.file(*k.path(b"usr", b"bin", b"sleep", ino=15, nlink=2)), parent=init)
    w = k.walker()
    procs = {p.pid: p for p in w.processes(k.init_task)}
    assert w.anomalies == []
    assert procs[1].status == RUNNING and procs[1].exe is not None
    assert procs[1].exe.path == "/bin/busybox" and procs[1].exe.inode == 15 and procs[1].exe.nlink == 2
    assert procs[1].exe.fstype == "ext4" and procs[1].exe.device == "254:0"
    assert procs[1].exe.fs_uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f" and not procs[1].exe.deleted
    assert procs[108].exe is not None and procs[108].exe.path == "/usr/bin/sleep" and procs[108].ppid == 1
    assert procs[2].kernel_thread and procs[2].status == KERNEL_THREAD and procs[2].exe is None
    assert (procs[1].comm == "init" and procs[1].ppid == 0) or procs[1].ppid is not None


def test_a_file_on_a_submount_and_one_hidden_under_the_root_mount() -> None:
    k = FakeKernel()
    # tmpfs mounted on /run of the ext4 root
    run_dir = k.dentry(b"run", k.root, k.inode(50, 2, k.ext4))
    tmpfs = k.superblock("tmpfs", 23, bytes(16))
    tmp_root = k.dentry(b"/", None, k.inode(1, 2, tmpfs))
    tmp_mnt = k.mount(tmp_root, k.root_mnt, run_dir)
    k.task(300, b"x", exe=k.file(*k.path(b"evil", ino=7, sb=tmpfs, mnt=tmp_mnt, root=tmp_root)))
    # a program on the initramfs (rootfs), which the ext4 root now covers
    k.task(
        301, b"y", exe=k.file(*k.path(b"hgt", b"intruder", ino=9, sb=k.rootfs, mnt=k.rootfs_mnt, root=k.rootfs_root))
    )
    procs = {p.pid: p for p in k.walker().processes(k.init_task)}
    assert procs[300].exe is not None and procs[300].exe.path == "/run/evil" and procs[300].exe.fstype == "tmpfs"
    assert procs[300].exe.fs_uuid is None  # all-zero UUID
    assert procs[301].exe is not None and procs[301].exe.path == "/hgt/intruder" and procs[301].exe.fstype == "rootfs"


def test_deleted_executables_are_flagged() -> None:
    k = FakeKernel()
    k.task(10, b"unhashed", exe=k.file(*k.path(b"usr", b"bin", b"sleep", ino=15, nlink=1, hashed=False)))
    k.task(11, b"nlink0", exe=k.file(*k.path(b"tmp", b"x", ino=16, nlink=0)))
    procs = {p.pid: p for p in k.walker().processes(k.init_task)}
    assert procs[10].exe is not None and procs[10].exe.deleted and procs[10].exe.path == "/usr/bin/sleep"
    assert procs[11].exe is not None and procs[11].exe.deleted


def test_detached_mount_paths_are_marked() -> None:
    k = FakeKernel()
    lone_sb = k.superblock("ext4", 7, bytes(16))
    lone_root = k.dentry(b"/", None, k.inode(2, 2, lone_sb))
    lone = k.mount(lone_root, None, None)  # its own parent, but not the tree we walked from: umount -l
    vfsmnt, d = k.path(b"bin", b"busybox", sb=lone_sb, mnt=lone, root=lone_root)
    # a dentry whose chain ends at a filesystem root that is not its mount's root
    orphan_root = k.dentry(b"/", None, k.inode(3, 1, k.ext4))
    orphan = k.dentry(b"x", orphan_root, k.inode(4, 1, k.ext4))
    k.task(20, b"lone", exe=k.file(vfsmnt, d))
    k.task(21, b"orphan", exe=k.file(k.root_mnt + 0x20, orphan))
    procs = {p.pid: p for p in k.walker().processes(k.init_task)}
    assert procs[20].exe is not None and procs[20].exe.path == "/bin/busybox"  # its own tree root: attached
    assert procs[21].exe is not None and procs[21].exe.path == DETACHED_PREFIX + "/x"


def test_fileless_memfd_executable_is_named_detached_and_deleted() -> None:
    k = FakeKernel()
    shm = k.superblock("tmpfs", 1, bytes(16))
    shm_root = k.dentry(b"/", None, k.inode(1, 2, shm))
    shm_mnt = k.mount(shm_root, None, None)  # the kernel's internal shm mount
    memfd = k.dentry(b"memfd:evil", None, k.inode(77, 0, shm), hashed=False)  # d_alloc_pseudo: its own parent
    k.task(40, b"x", exe=k.file(shm_mnt + 0x20, memfd))
    (p,) = k.walker().processes(k.init_task)
    assert p.exe is not None and p.exe.path == DETACHED_PREFIX + "/memfd:evil"
    assert p.exe.deleted and p.exe.fstype == "tmpfs" and p.exe.inode == 77


def test_processes_without_executables() -> None:
    k = FakeKernel()
    k.task(30, b"zombie", mm=False)
    k.task(31, b"noexe", exe=None)
    bad_file = k.mem.alloc(0x40)
    k.mem.put(bad_file + 0x10, "QQ", 0x1234, 0x5678)  # points nowhere
    k.task(32, b"garbage", exe=bad_file)
    procs = {p.pid: p for p in k.walker().processes(k.init_task)}
    assert procs[30].status == EXITING and procs[30].exe is None
    assert procs[31].status == NO_EXECUTABLE
    assert procs[32].status == UNREADABLE and "unreadable" in (procs[32].problem or "")


def test_task_list_cycle_is_detected_and_walk_stops() -> None:
    k = FakeKernel()
    a = k.task(1, b"a")
    b = k.task(2, b"b")
    k.mem.put(b + 0x10, "Q", a + 0x10)  # b.next -> a: a loop that never returns to init_task
    w = k.walker()
    procs = w.processes(k.init_task)
    assert [p.pid for p in procs] == [1, 2]
    assert any("cycle" in a for a in w.anomalies)


def test_broken_back_links_and_unmapped_next_are_anomalies() -> None:
    k = FakeKernel()
    k.task(1, b"a")
    b = k.task(2, b"b")
    k.mem.put(b + 0x10 + 8, "Q", 0x4242)  # b.prev does not point back at a
    w = k.walker()
    assert [p.pid for p in w.processes(k.init_task)] == [1, 2]
    assert any("prev link" in a for a in w.anomalies)

    k2 = FakeKernel()
    c = k2.task(1, b"c")
    k2.mem.put(c + 0x10, "Q", 0x7777000)  # next points into unmapped memory
    w2 = k2.walker()
    assert [p.pid for p in w2.processes(k2.init_task)] == [1]
    assert any("broken" in a for a in w2.anomalies)


def test_task_limit_is_enforced() -> None:
    k = FakeKernel()
    for pid in range(1, 30):
        k.task(pid, b"p")
    w = k.walker(WalkLimits(max_tasks=10))
    assert len(w.processes(k.init_task)) == 10
    assert any("more than 10" in a for a in w.anomalies)


def test_path_bounds_names_and_dentry_cycles() -> None:
    k = FakeKernel()
    deep = k.path(*[b"d"] * 40, b"x")
    k.task(1, b"deep", exe=k.file(*deep))
    w = k.walker(WalkLimits(max_path_components=16))
    assert w.processes(k.init_task)[0].status == UNREADABLE

    k = FakeKernel()
    vfsmnt, d = k.path(b"a", b"b")
    parent = int.from_bytes(k.mem.read(d + 0x18, 8), "little")
    k.mem.put(parent + 0x18, "Q", d)  # a's parent is b: a cycle below the root
    k.task(2, b"loop", exe=k.file(vfsmnt, d))
    p = k.walker().processes(k.init_task)[0]
    assert p.status == UNREADABLE and "cycle" in (p.problem or "")

    for bad in (b"", b"a/b", b"..", b"x" * 300):
        k = FakeKernel()
        vfsmnt, d = k.path(b"ok")
        text = k.mem.alloc(len(bad) + 1, bad)
        k.mem.put(d + 0x20 + 4, "I", len(bad))
        k.mem.put(d + 0x20 + 8, "Q", text)
        k.task(3, b"badname", exe=k.file(vfsmnt, d))
        assert k.walker().processes(k.init_task)[0].status == UNREADABLE, bad


def test_mount_chain_cycle_is_an_error() -> None:
    k = FakeKernel()
    other_root = k.dentry(b"/", None, k.inode(5, 2, k.ext4))
    m1 = k.mount(other_root, None, None)
    m2 = k.mount(other_root, m1, other_root)
    k.mem.put(m1 + 0x10, "Q", m2)  # m1's parent is m2, m2's is m1
    k.mem.put(m1 + 0x18, "Q", other_root)
    vfsmnt, d = k.path(b"f", mnt=m1, root=other_root)
    k.task(4, b"mnt", exe=k.file(vfsmnt, d))
    p = k.walker().processes(k.init_task)[0]
    assert p.status == UNREADABLE


def test_modules_names_states_and_malformed_names() -> None:
    k = FakeKernel()
    k.module(b"virtio_blk")
    k.module(b"ext4", 1)
    k.module(b"bad\x01name")
    w = k.walker()
    mods = w.modules(k.modules_head)
    assert [(m.name, m.state) for m in mods[:2]] == [("virtio_blk", "live"), ("ext4", "coming")]
    assert mods[2].name == "bad\\x01name"
    assert any("malformed name" in a for a in w.anomalies)


def test_release_string() -> None:
    k = FakeKernel()
    uts = k.mem.alloc(400)
    k.mem.put_bytes(uts + 130, b"6.1.0-56-amd64\0")
    assert k.walker().release(uts) == "6.1.0-56-amd64"


@pytest.mark.parametrize("address", [0, -0x10, (1 << 64) - 0x10])
def test_impossible_addresses_are_anomalies_not_crashes(address: int) -> None:
    w = FakeKernel().walker()
    assert w.processes(address) == []
    assert w.modules(address) == []
    assert len(w.anomalies) == 2 and all("broken" in a for a in w.anomalies)


def test_strings_near_a_page_end_do_not_read_the_next_page() -> None:
    mem = FakeMemory()
    page = mem.alloc(4096)
    mem.put_bytes(page + 4090, b"ext4\0")
    w = Walker(mem, LAYOUT)
    assert w.cstring(page + 4090, 64) == b"ext4"
    mem.put_bytes(page + 4090, b"abcdef")  # no NUL before the page ends, and the next page is unmapped
    with pytest.raises(MemoryFault):
        w.cstring(page + 4090, 64)
    assert w.cstring(page + 10, 4) == b"\0\0\0\0"[:0]
