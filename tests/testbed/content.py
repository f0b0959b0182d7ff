"""The known content of the busybox guest's root disk, and what an inventory of it must find.

`populate_root(dest)` writes the tree (as root: ownership, setuid bits and file capabilities are real) and
returns one `ExpectedFile` per regular file, keyed by the path as the guest sees it (manifest path encoding).
`mkfs.ext4 -d dest` then turns the tree into the guest's root filesystem, keeping all of that metadata.

The tree deliberately covers every case of the executable-component rule (see `is_executable_component`):
ELF programs, a script with a shebang, a shared library without any x bit, setuid and setgid files, a file
capability, a hard link, a kernel module, kernel/initrd stand-ins under /boot, a 0700 program owned by
uid 1000, a non-UTF-8 file name, and plain data files that are NOT components.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import lzma
import os
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hostguard.signed.manifest import encode_path

MARKER = "HOSTGUARD-TESTBED-READY"
KERNEL_VERSION_FALLBACK = "6.1.0-0-amd64"

BUSYBOX = Path("/bin/busybox")
# Busybox applets the guest's scripts use; each is a symlink to /bin/busybox (symlinks are not entries).
APPLETS = (
    "sh",
    "ash",
    "mount",
    "umount",
    "cat",
    "echo",
    "sleep",
    "ls",
    "ps",
    "mkdir",
    "sync",
    "grep",
    "stat",
    "sha256sum",
    "dmesg",
    "uname",
    "poweroff",
    "reboot",
    "halt",
    "true",
    "false",
    "id",
    "head",
    "tail",
    "sed",
    "tr",
    "cut",
    "wc",
    "date",
    "rm",
    "cp",
    "mv",
    "chmod",
    "touch",
    "ln",
    "hexdump",
    "od",
    "setsid",
    "dd",
    "insmod",
    "lsmod",
    "kill",
    "free",
    "df",
    "find",
    "env",
    "printf",
    "test",
    "[",
    "seq",
)

CAP_NET_RAW = 13
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001

COMPONENT_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")
BOOT_COMPONENT_PREFIXES = (b"vmlinuz", b"initrd", b"initramfs")
ELF_MAGIC = b"\x7fELF"

# The guest's PID 1 after switch_root. It prints the marker, then runs what the kernel command line asks:
#   hostguard.run=/path      start /path in the background (may repeat; path must not contain spaces)
#   hostguard.poweroff=1     power off right after the marker (and after the hostguard.run programs started)
# and otherwise keeps running, so the domain stays up for the host to inspect.
INIT_SCRIPT = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null
con=/dev/ttyS0
[ -c "$con" ] || con=/dev/console
poweroff_flag=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hostguard.run=*) setsid "${{arg#hostguard.run=}}" </dev/null >"$con" 2>&1 & ;;
    hostguard.poweroff=1) poweroff_flag=1 ;;
  esac
done
/usr/bin/sleep 86400 </dev/null >/dev/null 2>&1 &
echo "{MARKER} kernel=$(uname -r) pid=$$" >"$con"
if [ "$poweroff_flag" = 1 ]; then
  sync
  poweroff -f
fi
while :; do sleep 3600; done
"""

SHEBANG_SCRIPT = """#!/bin/sh
# A script component: the inventory must list it because it has an x bit.
echo "hello from $0"
"""

USER_TOOL = """#!/bin/sh
# Owned by uid 1000, mode 0700.
echo "user tool running as $(id -u)"
"""

BAD_NAME_SCRIPT = """#!/bin/sh
echo "a program whose name is not UTF-8"
"""


@dataclass(frozen=True)
class ExpectedFile:
    """What an inventory of the guest root must report for one regular file."""

    path: str  # absolute guest path, hostguard.signed.manifest.encode_path form
    mode: int  # st_mode & 0o7777
    uid: int
    gid: int
    capabilities: str | None  # getcap text form, e.g. "cap_net_raw=ep"
    sha256: str
    size: int
    executable_component: bool


def is_executable_component(guest_path: bytes, mode: int, head: bytes, has_capability: bool) -> bool:
    """The rule: any x bit, ELF magic, setuid/setgid, a security.capability xattr, a kernel module name, or a
    kernel/initrd name directly under /boot. `mode` is st_mode (or its permission bits), `head` the first
    bytes of the file."""
    if mode & 0o111 or mode & (stat.S_ISUID | stat.S_ISGID) or has_capability:
        return True
    if head.startswith(ELF_MAGIC):
        return True
    name = guest_path.rsplit(b"/", 1)[-1]
    if any(name.endswith(s.encode()) for s in COMPONENT_MODULE_SUFFIXES):
        return True
    return guest_path.startswith(b"/boot/") and name.startswith(BOOT_COMPONENT_PREFIXES)


def cap_xattr(cap_bits: int, *, effective: bool) -> bytes:
    """`security.capability` value, VFS v2 layout: magic_etc, then (permitted, inheritable) low/high words."""
    magic = VFS_CAP_REVISION_2 | (VFS_CAP_FLAGS_EFFECTIVE if effective else 0)
    return struct.pack("<IIIII", magic, cap_bits & 0xFFFFFFFF, 0, cap_bits >> 32, 0)


def parse_cap_xattr(value: bytes) -> str:
    """Text form (getcap style) of a VFS v2/v3 `security.capability` value; only the names we use."""
    magic, p_lo, i_lo, p_hi, i_hi = struct.unpack_from("<IIIII", value)
    permitted = p_lo | (p_hi << 32)
    inheritable = i_lo | (i_hi << 32)
    names = {CAP_NET_RAW: "cap_net_raw"}
    caps = sorted(set(_bits(permitted)) | set(_bits(inheritable)))
    parts = []
    for bit in caps:
        flags = ("e" if magic & VFS_CAP_FLAGS_EFFECTIVE else "") + ("i" if bit in _bits(inheritable) else "")
        flags += "p" if bit in _bits(permitted) else ""
        parts.append(f"{names.get(bit, f'cap_{bit}')}={flags}")
    return ",".join(parts)


def _bits(value: int) -> list[int]:
    return [i for i in range(64) if value >> i & 1]


def kernel_version() -> str:
    """Version of the Debian kernel package in /boot (not `uname -r`: the host may run another kernel)."""
    versions = sorted(
        p.name.removeprefix("vmlinuz-")
        for p in Path("/boot").glob("vmlinuz-*")
        if (Path("/lib/modules") / p.name.removeprefix("vmlinuz-") / "modules.dep").exists()
    )
    return versions[-1] if versions else KERNEL_VERSION_FALLBACK


def read_module(path: Path) -> bytes:
    """A kernel module's bytes, decompressed if it is .ko.xz or .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def _find_module(version: str, name: str) -> Path | None:
    root = Path("/lib/modules") / version / "kernel"
    for suffix in COMPONENT_MODULE_SUFFIXES:
        found = sorted(root.rglob(name + suffix))
        if found:
            return found[0]
    return None


class _Writer:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.expected: dict[str, ExpectedFile] = {}

    def host(self, guest: bytes) -> Path:
        assert guest.startswith(b"/")
        return self.dest / os.fsdecode(guest[1:])

    def dir(self, guest: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        p = self.host(guest)
        p.mkdir(parents=True, exist_ok=True)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    def file(
        self, guest: bytes, data: bytes, mode: int, *, uid: int = 0, gid: int = 0, cap: bytes | None = None
    ) -> None:
        p = self.host(guest)
        parent = guest.rsplit(b"/", 1)[0] or b"/"
        if not self.host(parent).is_dir():
            self.dir(parent)
        p.write_bytes(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)  # after chown: chown clears setuid/setgid
        captext = None
        if cap is not None:
            os.setxattr(p, "security.capability", cap)
            captext = parse_cap_xattr(cap)
        self._record(guest, data, mode, uid, gid, captext)

    def hardlink(self, guest: bytes, target: bytes) -> None:
        os.link(self.host(target), self.host(guest))
        entry = self.expected[encode_path(target)]
        self.expected[encode_path(guest)] = ExpectedFile(
            encode_path(guest),
            entry.mode,
            entry.uid,
            entry.gid,
            entry.capabilities,
            entry.sha256,
            entry.size,
            entry.executable_component,
        )

    def symlink(self, guest: bytes, target: str) -> None:
        p = self.host(guest)
        if not p.parent.is_dir():
            self.dir(guest.rsplit(b"/", 1)[0])
        p.symlink_to(target)

    def _record(self, guest: bytes, data: bytes, mode: int, uid: int, gid: int, cap: str | None) -> None:
        path = encode_path(guest)
        self.expected[path] = ExpectedFile(
            path=path,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            capabilities=cap,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            executable_component=is_executable_component(guest, mode, data[:4], cap is not None),
        )


def populate_root(dest: Path, *, kver: str | None = None) -> dict[str, ExpectedFile]:
    """Write the busybox guest's root tree into `dest` (must be empty or absent; needs root for chown and the
    capability xattr) and return the expected inventory: one entry per regular file, hard links included."""
    if os.geteuid() != 0:
        raise PermissionError("populate_root needs root (chown, setuid bits, security.capability)")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    version = kver or kernel_version()
    w = _Writer(dest)
    os.chmod(dest, 0o755)
    for d in (
        b"/bin",
        b"/sbin",
        b"/usr/bin",
        b"/usr/sbin",
        b"/usr/local/bin",
        b"/etc",
        b"/proc",
        b"/sys",
        b"/dev",
        b"/run",
        b"/root",
        b"/var",
        b"/srv",
        b"/opt",
        b"/boot",
        b"/lib",
        b"/usr/lib",
    ):
        w.dir(d)
    w.dir(b"/tmp", 0o1777)
    w.dir(b"/root", 0o700)
    w.dir(b"/home/user", 0o755, 1000, 1000)

    # Busybox and its applets. /usr/bin/sleep is a hard link (a second regular-file entry, same inode).
    w.file(b"/bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        w.symlink(b"/bin/" + applet.encode(), "busybox")
    w.hardlink(b"/usr/bin/sleep", b"/bin/busybox")
    w.file(b"/sbin/init", INIT_SCRIPT.encode(), 0o755)

    # Host ELF programs with distinct contents: plain, setuid root, file capability, setgid-without-x.
    w.file(b"/usr/bin/true", Path("/usr/bin/true").read_bytes(), 0o755)
    w.file(b"/usr/bin/suid-false", Path("/usr/bin/false").read_bytes(), 0o4755)
    w.file(
        b"/usr/bin/ping-cap", Path("/usr/bin/echo").read_bytes(), 0o755, cap=cap_xattr(1 << CAP_NET_RAW, effective=True)
    )
    w.file(b"/usr/bin/sgid-data", b"setgid but no x bit: still a component\n", 0o2644, gid=50)

    # A shared library without any x bit: a component by its ELF magic alone.
    libname = "libBrokenLocale.so.1"
    w.file(b"/usr/lib/" + libname.encode(), (Path("/usr/lib/x86_64-linux-gnu") / libname).read_bytes(), 0o644)

    # Scripts: one with a shebang, one 0700 owned by uid 1000, one with a non-UTF-8 name.
    w.file(b"/usr/local/bin/hello.sh", SHEBANG_SCRIPT.encode(), 0o755)
    w.file(b"/home/user/user-tool", USER_TOOL.encode(), 0o700, uid=1000, gid=1000)
    w.file(b"/opt/bad\xff name", BAD_NAME_SCRIPT.encode(), 0o755)

    # Kernel module, and kernel/initrd stand-ins under /boot (components by name), and a /boot data file.
    module = _find_module(version, "dummy")
    ko = read_module(module) if module is not None else ELF_MAGIC + b"\0stand-in module\n"
    w.file(f"/lib/modules/{version}/kernel/test/dummy.ko".encode(), ko, 0o644)
    w.file(b"/boot/vmlinuz-test", b"stand-in kernel image, not bootable\n" * 8, 0o644)
    w.file(b"/boot/initrd.img-test", b"stand-in initrd\n", 0o644)
    w.file(b"/boot/config-test", b"CONFIG_TEST=y\n", 0o644)

    # Plain data: not components.
    w.file(b"/etc/hostname", b"hostguard-testbed\n", 0o644)
    w.file(b"/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n", 0o644)
    w.file(b"/etc/group", b"root:x:0:\nstaff:x:50:\nuser:x:1000:\n", 0o644)
    w.file(b"/etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640, gid=42)
    w.file(b"/srv/data.bin", bytes(range(256)) * 64, 0o644)
    w.file(b"/srv/empty", b"", 0o600)
    return w.expected


def read_capabilities(path: bytes | Path) -> str | None:
    """getcap-style text of a file's `security.capability`, or None when it has none."""
    try:
        value = os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    return parse_cap_xattr(value)


def expect_tree(root: Path) -> dict[str, ExpectedFile]:
    """Read back a populated tree from the host side: one `ExpectedFile` per regular file (symlinks skipped,
    hard links listed under every name). Independent of `populate_root`, so each can check the other."""
    out: dict[str, ExpectedFile] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            host = os.path.join(dirpath, name)
            st = os.lstat(host)
            if not stat.S_ISREG(st.st_mode):
                continue
            guest = b"/" + os.path.relpath(host, base)
            h = hashlib.sha256()
            with open(host, "rb") as fh:
                head = fh.read(4)
                h.update(head)
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            caps = read_capabilities(host)
            path = encode_path(guest)
            out[path] = ExpectedFile(
                path=path,
                mode=st.st_mode & 0o7777,
                uid=st.st_uid,
                gid=st.st_gid,
                capabilities=caps,
                sha256=h.hexdigest(),
                size=st.st_size,
                executable_component=is_executable_component(guest, st.st_mode, head, caps is not None),
            )
    return out


def expectations_to_json(expected: dict[str, ExpectedFile]) -> str:
    return json.dumps([dataclasses.asdict(e) for e in expected.values()], indent=1, sort_keys=True)


def expectations_from_json(text: str) -> dict[str, ExpectedFile]:
    return {d["path"]: ExpectedFile(**d) for d in json.loads(text)}
