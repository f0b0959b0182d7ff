"""The test bed's known guest content is what it claims: modes, owners, capabilities, the component rule."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from hostguard.signed.manifest import decode_path
from tests.testbed import content, guests, images
from tests.testbed.content import ExpectedFile, is_executable_component, populate_root
from tests.testbed.prereq import require, require_root, require_tool


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, ExpectedFile]]:
    require_root()
    require(content.BUSYBOX.is_file(), "busybox-static is not installed")
    dest = tmp_path_factory.mktemp("root") / "tree"
    return dest, populate_root(dest)


def host(dest: Path, guest: bytes) -> bytes:
    return os.fsencode(dest) + guest


def test_every_regular_file_has_an_expectation_and_they_match_a_read_back(
    tree: tuple[Path, dict[str, ExpectedFile]],
) -> None:
    dest, expected = tree
    assert content.expect_tree(dest) == expected
    regular = [
        os.path.join(d, n)
        for d, _, names in os.walk(os.fsencode(dest))
        for n in names
        if stat.S_ISREG(os.lstat(os.path.join(d, n)).st_mode)
    ]
    assert len(regular) == len(expected)


def test_modes_owners_and_links(tree: tuple[Path, dict[str, ExpectedFile]]) -> None:
    dest, expected = tree
    for path, entry in expected.items():
        st = os.lstat(host(dest, decode_path(path)))
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size) == (
            entry.mode,
            entry.uid,
            entry.gid,
            entry.size,
        ), path
    assert expected["/usr/bin/suid-false"].mode == 0o4755
    assert expected["/usr/bin/sgid-data"].mode == 0o2644
    tool = expected["/home/user/user-tool"]
    assert (tool.mode, tool.uid, tool.gid) == (0o700, 1000, 1000)
    assert expected["/usr/lib/libBrokenLocale.so.1"].mode == 0o644
    # Hard link: two entries, one inode. Symlinks (busybox applets) are not entries.
    assert os.stat(dest / "usr/bin/sleep").st_ino == os.stat(dest / "bin/busybox").st_ino
    assert expected["/usr/bin/sleep"].sha256 == expected["/bin/busybox"].sha256
    assert (dest / "bin/sh").is_symlink() and "/bin/sh" not in expected
    # The non-UTF-8 name is real bytes on disk and %XX-encoded in the expectation.
    assert os.path.isfile(os.fsencode(dest) + b"/opt/bad\xff name")
    assert "/opt/bad%FF name" in expected


def test_capability_xattr_is_vfs_v2_cap_net_raw_effective(tree: tuple[Path, dict[str, ExpectedFile]]) -> None:
    dest, expected = tree
    raw = os.getxattr(dest / "usr/bin/ping-cap", "security.capability")
    assert raw == struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    assert expected["/usr/bin/ping-cap"].capabilities == "cap_net_raw=ep"
    assert [p for p, e in expected.items() if e.capabilities] == ["/usr/bin/ping-cap"]
    if shutil.which("getcap"):
        out = subprocess.run(["getcap", str(dest / "usr/bin/ping-cap")], capture_output=True, text=True).stdout
        assert out.split()[-1] == "cap_net_raw=ep"


def test_component_rule_is_applied(tree: tuple[Path, dict[str, ExpectedFile]]) -> None:
    _, expected = tree
    components = {p for p, e in expected.items() if e.executable_component}
    assert components == {
        "/bin/busybox",
        "/usr/bin/sleep",
        "/sbin/init",
        "/usr/bin/true",
        "/usr/bin/suid-false",
        "/usr/bin/ping-cap",
        "/usr/bin/sgid-data",
        "/usr/lib/libBrokenLocale.so.1",
        "/usr/local/bin/hello.sh",
        "/home/user/user-tool",
        "/opt/bad%FF name",
        f"/lib/modules/{content.kernel_version()}/kernel/test/dummy.ko",
        "/boot/vmlinuz-test",
        "/boot/initrd.img-test",
    }
    plain = set(expected) - components
    assert {"/etc/hostname", "/boot/config-test", "/srv/data.bin", "/srv/empty", "/etc/shadow"} <= plain


@pytest.mark.parametrize(
    ("path", "mode", "head", "cap", "want"),
    [
        (b"/usr/bin/x", 0o100755, b"#!/b", False, True),
        (b"/usr/bin/x", 0o100700, b"data", False, True),
        (b"/usr/bin/x", 0o100001, b"data", False, True),
        (b"/usr/lib/libx.so", 0o100644, b"\x7fELF", False, True),
        (b"/usr/bin/x", 0o104644, b"data", False, True),
        (b"/usr/bin/x", 0o102644, b"data", False, True),
        (b"/usr/bin/x", 0o100644, b"data", True, True),
        (b"/lib/modules/v/a.ko", 0o100644, b"data", False, True),
        (b"/lib/modules/v/a.ko.xz", 0o100644, b"\xfd7zX", False, True),
        (b"/lib/modules/v/a.ko.zst", 0o100644, b"(\xb5/\xfd", False, True),
        (b"/boot/vmlinuz-6.1", 0o100600, b"MZ\x00\x00", False, True),
        (b"/boot/initrd.img-6.1", 0o100644, b"\x1f\x8b\x08\x00", False, True),
        (b"/boot/initramfs-6.1.img", 0o100644, b"0707", False, True),
        (b"/boot/config-6.1", 0o100644, b"#\n# ", False, False),
        (b"/srv/vmlinuz", 0o100644, b"MZ\x00\x00", False, False),
        (b"/etc/hostname", 0o100644, b"host", False, False),
        (b"/srv/a.kox", 0o100644, b"data", False, False),
        (b"/srv/empty", 0o100600, b"", False, False),
    ],
)
def test_component_rule_cases(path: bytes, mode: int, head: bytes, cap: bool, want: bool) -> None:
    assert is_executable_component(path, mode, head, cap) is want


def test_init_prints_the_marker() -> None:
    assert f'echo "{content.MARKER} ' in content.INIT_SCRIPT
    assert content.INIT_SCRIPT.startswith("#!/bin/sh\n")


def test_module_closure_puts_dependencies_first() -> None:
    version = content.kernel_version()
    require(Path(f"/lib/modules/{version}/modules.dep").is_file(), "no kernel modules installed")
    order = [p.rsplit("/", 1)[-1].split(".ko")[0] for p in guests.module_closure(version, guests.INITRAMFS_MODULES)]
    for before, after in (
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_pci"),
        ("virtio", "virtio_blk"),
        ("jbd2", "ext4"),
        ("mbcache", "ext4"),
        ("crc16", "ext4"),
    ):
        assert order.index(before) < order.index(after)
    assert "qemu_fw_cfg" in order and "crc32c_generic" in order
    assert len(order) == len(set(order))


def test_cache_builds_once_and_keeps_no_half_built_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(images.CACHE_ENV, str(tmp_path))
    calls: list[Path] = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "out").write_text("built")

    first = images.cached(["a", "b"], build, name="t")
    again = images.cached(["a", "b"], build, name="t")
    other = images.cached(["a", "c"], build, name="t")
    assert first == again != other
    assert len(calls) == 2 and (first / "out").read_text() == "built"

    def broken(d: Path) -> None:
        (d / "partial").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        images.cached(["x"], broken, name="t")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted([first.name, other.name])


def test_ext4_image_keeps_metadata_and_gpt_disk_holds_it(
    tree: tuple[Path, dict[str, ExpectedFile]], tmp_path: Path
) -> None:
    dest, _ = tree
    for tool in ("mkfs.ext4", "debugfs", "sgdisk"):
        require_tool(tool)
    img = images.make_ext4(dest, tmp_path / "root.raw", 16)

    def debugfs(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(img)], capture_output=True, text=True).stdout

    assert "security.capability (20) = 01 00 00 02 00 20 00 00" in debugfs("ea_list /usr/bin/ping-cap")
    assert "Mode:  04755" in debugfs("stat /usr/bin/suid-false")
    assert "User:  1000   Group:  1000" in debugfs("stat /home/user/user-tool")
    assert "Links: 2" in debugfs("stat /bin/busybox")

    disk = images.make_gpt_disk([img, img], tmp_path / "disk.raw")
    table = subprocess.run(["sgdisk", "-p", str(disk)], capture_output=True, text=True, check=True).stdout
    starts = [int(line.split()[1]) for line in table.splitlines() if line.strip()[:1].isdigit() and "8300" in line]
    assert len(starts) == 2
    with disk.open("rb") as fh:
        for start in starts:
            fh.seek(start * 512)
            assert fh.read(img.stat().st_size) == img.read_bytes()


def test_prune_removes_only_stale_entries_of_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(images.CACHE_ENV, str(tmp_path))
    old = images.cached(["old"], lambda d: None, name="p")
    fresh = images.cached(["fresh"], lambda d: None, name="p")
    other = images.cached(["other"], lambda d: None, name="q")
    for entry in (old, other):
        os.utime(entry / ".last-used", (0, 0))
    assert images.prune("p", older_than=3600) == [old]
    assert not old.exists() and fresh.exists() and other.exists()


def test_libvirt_env_domain_xml_and_cleanup_on_the_test_driver(tmp_path: Path) -> None:
    require(importlib.util.find_spec("libvirt") is not None, "python3-libvirt is not importable")
    import libvirt

    from tests.testbed.libvirt_env import Disk, LibvirtEnv

    kernel, initrd, root = (tmp_path / n for n in ("vmlinuz", "initrd.img", "root.qcow2"))
    for f in (kernel, initrd, root):
        f.write_bytes(b"stand-in")
    guest = guests.Guest("fake", kernel, initrd, root, root, {}, "MARK", "6.1.0-0-amd64")
    env = LibvirtEnv("test:///default", work_root=tmp_path / "work")
    with env:
        dom = env.define_guest(
            "x",
            guest,
            cmdline_extra="hostguard.poweroff=1",
            extra_disks=[tmp_path / "data.raw", Disk(tmp_path / "ro.qcow2", readonly=True)],
            metadata_xml="<hg:verdict xmlns:hg='urn:hostguard-test'>allow</hg:verdict>",
        )
        xml = dom.XMLDesc()
        assert dom.name() == env.prefix + "x" and env.prefix.startswith(f"hgt-{os.getpid()}-")
        assert xml.startswith("<domain type='qemu'")
        assert "<vmcoreinfo state='on'/>" in xml and "<acpi/>" in xml
        assert "console=ttyS0 panic=-1 loglevel=4 hostguard.poweroff=1" in xml
        assert "<driver name='qemu' type='qcow2'/>" in xml and "<driver name='qemu' type='raw'/>" in xml
        for target in ("vda", "vdb", "vdc"):
            assert f"<target dev='{target}' bus='virtio'/>" in xml
        assert f"<source path='{env.workdir}/x-console.log' append='off'/>" in xml
        assert "<interface" not in xml and "<graphics" not in xml
        assert "urn:hostguard-test" in xml
        # The root disk and the kernel are private copies in the work directory, not the originals.
        assert f"<source file='{env.workdir}/x-root.qcow2'/>" in xml
        assert str(kernel) not in xml and (env.workdir / "boot-0-vmlinuz").read_bytes() == b"stand-in"
        name = dom.name()
        assert name in [d.name() for d in libvirt.open("test:///default").listAllDomains()]
    # test:///default keeps one state per process: a new connection sees the domain gone.
    assert name not in [d.name() for d in libvirt.open("test:///default").listAllDomains()]
    assert not env.workdir.exists()
