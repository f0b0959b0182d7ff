"""The component rule and the inventory engine, over an in-memory reader (no disk images)."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostguard.errors import ImageError
from hostguard.imagefs import FilesystemInfo, FsNode, GuestFilesystemReader, Limits, NodeKind
from hostguard.imagefs.inventory import inventory, is_executable_component, manifest_path
from hostguard.signed.manifest import decode_path, encode_path

CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def node(path: bytes, mode: int = 0o644, *, data: bytes = b"", kind: NodeKind = NodeKind.FILE, **kw: object) -> FsNode:
    head = b"" if mode & 0o111 else data[:4]
    fields: dict[str, object] = {"uid": 0, "gid": 0, "inode": None, "nlink": 1, "capability": None}
    fields.update(kw)
    return FsNode(path, kind, mode, size=len(data), head=head, handle=data, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "n", "expected"),
    [
        (b"/bin/x", node(b"/bin/x", 0o755), True),
        (b"/bin/x", node(b"/bin/x", 0o700), True),
        (b"/bin/x", node(b"/bin/x", 0o001), True),
        (b"/bin/x", node(b"/bin/x", 0o4644), True),
        (b"/bin/x", node(b"/bin/x", 0o2644), True),
        (b"/bin/x", node(b"/bin/x", 0o644, capability=CAP_NET_RAW), True),
        (b"/lib/x.so", node(b"/lib/x.so", 0o644, data=b"\x7fELF\x02"), True),
        (b"/lib/x.so", node(b"/lib/x.so", 0o644, data=b"\x7fELX"), False),
        (b"/etc/data", node(b"/etc/data", 0o644, data=b"data"), False),
        (b"/m/a.ko", node(b"/m/a.ko", 0o644), True),
        (b"/m/a.ko.xz", node(b"/m/a.ko.xz", 0o644), True),
        (b"/m/a.ko.zst", node(b"/m/a.ko.zst", 0o644), True),
        (b"/m/a.ko.gz", node(b"/m/a.ko.gz", 0o644), False),
        (b"/boot/vmlinuz-6.1", node(b"/boot/vmlinuz-6.1"), True),
        (b"/boot/initrd.img-6.1", node(b"/boot/initrd.img-6.1"), True),
        (b"/boot/sub/initramfs-linux.img", node(b"/boot/sub/initramfs-linux.img"), True),
        (b"/boot/config-6.1", node(b"/boot/config-6.1"), False),
        (b"/vmlinuz-6.1", node(b"/vmlinuz-6.1"), False),
        (b"//disk0p2/vmlinuz-6.1", node(b"/vmlinuz-6.1"), True),  # an unplaced boot partition
        (b"/bin/sh", node(b"/bin/sh", 0o777, kind=NodeKind.SYMLINK), False),
        (b"/bin", node(b"/bin", 0o755, kind=NodeKind.DIR), False),
        (b"/dev/x", node(b"/dev/x", 0o755, kind=NodeKind.OTHER), False),
    ],
)
def test_rule(path: bytes, n: FsNode, expected: bool) -> None:
    assert is_executable_component(path, n) is expected


class FakeReader(GuestFilesystemReader):
    """Nodes in memory; content is the node's handle. Counts reads to prove hard links are hashed once."""

    name = "fake"
    parallel_content = True

    def __init__(self, nodes: dict[str, list[FsNode]], fstab: bytes | None = None, limits: Limits | None = None):
        super().__init__(limits or Limits())
        self.nodes = nodes
        self.fstab = fstab
        self.reads: list[bytes] = []
        self.lock = threading.Lock()

    def filesystems(self) -> tuple[FilesystemInfo, ...]:
        return tuple(
            FilesystemInfo(loc, "ext4", 0, i or None, device=f"fake {loc}") for i, loc in enumerate(self.nodes)
        )

    def read_file(self, fs: FilesystemInfo, path: bytes, limit: int) -> bytes | None:
        return self.fstab if fs.locator == next(iter(self.nodes)) else None

    def walk(self, fs: FilesystemInfo) -> Iterator[FsNode]:
        yield from self.nodes[fs.locator]

    def read_chunks(self, n: FsNode) -> Iterator[bytes | memoryview]:
        with self.lock:
            self.reads.append(n.path)
        assert isinstance(n.handle, bytes)
        yield n.handle[: len(n.handle) // 2]
        yield n.handle[len(n.handle) // 2 :]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_inventory_hashes_hard_links_once_and_sorts() -> None:
    big = b"\x7fELF" + bytes(100_000)
    nodes = [
        node(b"/z/tool", 0o755, data=big, inode=12, nlink=2),
        node(b"/a/tool-link", 0o755, data=big, inode=12, nlink=2),
        node(b"/m/data", 0o644, data=b"plain"),
        node(b"/m/lib.so", 0o644, data=b"\x7fELFlib"),
        node(b"/s", 0o777, kind=NodeKind.SYMLINK),
    ]
    reader = FakeReader({"disk0": nodes})
    result = inventory(reader, workers=3)
    assert [f.path for f in result.files] == ["/a/tool-link", "/m/lib.so", "/z/tool"]
    assert result.files[0].sha256 == result.files[2].sha256 == sha(big)
    assert sorted(reader.reads) == [b"/a/tool-link", b"/m/lib.so"] or sorted(reader.reads) == [b"/m/lib.so", b"/z/tool"]
    assert result.hashed_files == 2 and result.nodes == 5


def test_capability_text_and_malformed_capability() -> None:
    ok = FakeReader({"disk0": [node(b"/ping", 0o755, data=b"x", capability=CAP_NET_RAW)]})
    assert inventory(ok).files[0].capabilities == "cap_net_raw=ep"
    bad = FakeReader({"disk0": [node(b"/ping", 0o755, data=b"x", capability=b"\x01\x02")]})
    with pytest.raises(ImageError, match=r"/ping: security.capability value of 2 bytes is too short"):
        inventory(bad)


def test_short_read_is_an_error() -> None:
    n = node(b"/bin/x", 0o755, data=b"abcdef")
    lying = FsNode(n.path, n.kind, n.mode, n.uid, n.gid, size=100, handle=n.handle)
    with pytest.raises(ImageError, match=r"read 6 bytes, the inode says 100"):
        inventory(FakeReader({"disk0": [lying]}), workers=2)


class FailingContentReader(FakeReader):
    def read_chunks(self, n: FsNode) -> Iterator[bytes | memoryview]:
        if n.path == b"/bin/bad":
            raise ImageError("fake disk0: /bin/bad: block 7 is outside the filesystem")
        return super().read_chunks(n)


def test_a_hashing_thread_failure_fails_the_whole_inventory() -> None:
    nodes = [node(b"/bin/%d" % i, 0o755, data=bytes(1000 + i)) for i in range(50)] + [node(b"/bin/bad", 0o755)]
    with pytest.raises(ImageError, match=r"/bin/bad: block 7 is outside"):
        inventory(FailingContentReader({"disk0": nodes}), workers=2)


class PriorityRecordingReader(FakeReader):
    priorities: list[int]

    def read_chunks(self, n: FsNode) -> Iterator[bytes | memoryview]:
        with self.lock:
            self.priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().read_chunks(n)


@pytest.mark.parametrize("yield_to_others", [False, True])
def test_hashing_threads_yield_to_other_work_only_when_asked(yield_to_others: bool) -> None:
    reader = PriorityRecordingReader({"disk0": [node(b"/bin/%d" % i, 0o755, data=bytes(i + 1)) for i in range(8)]})
    reader.priorities = []
    base = os.getpriority(os.PRIO_PROCESS, 0)
    inventory(reader, workers=2, yield_to_others=yield_to_others)
    want = min(19, base + 5) if yield_to_others else base
    assert reader.priorities and set(reader.priorities) == {want}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # this thread is untouched


class ExplodingReader(FakeReader):
    def walk(self, fs: FilesystemInfo) -> Iterator[FsNode]:
        yield node(b"/ok", 0o755, data=b"x")
        raise struct.error("unpack requires a buffer of 4 bytes")


def test_parser_exception_becomes_one_line_image_error() -> None:
    with pytest.raises(ImageError, match=r"fake disk0: /ok: malformed filesystem data \(error: unpack"):
        inventory(ExplodingReader({"disk0": []}))


def test_layout_from_fstab_places_second_filesystem() -> None:
    reader = FakeReader(
        {
            "disk0p1": [node(b"/bin/x", 0o755, data=b"x")],
            "disk0p2": [node(b"/vmlinuz-1", 0o644, data=b"kernel")],
        },
        fstab=b"/dev/vda2 /boot ext4 defaults 0 2\n",
    )
    result = inventory(reader)
    assert result.layout == {"disk0p1": "/", "disk0p2": "/boot"}
    assert [f.path for f in result.files] == ["/bin/x", "/boot/vmlinuz-1"]


def test_limits_on_files_and_path_length() -> None:
    many = [node(f"/bin/{i}".encode(), 0o755, data=b"x") for i in range(5)]
    with pytest.raises(ImageError, match=r"more than 4 executable components"):
        inventory(FakeReader({"disk0": many}, limits=Limits(max_files=4)))
    long = [node(b"/" + b"\xff" * 1500, 0o755, data=b"x")]  # 1500 bytes, 4500 characters encoded
    with pytest.raises(ImageError, match=r"path too long for a manifest"):
        inventory(FakeReader({"disk0": long}))


def test_remote_digest_reader_is_used_sequentially() -> None:
    class Remote(FakeReader):
        remote_digest = True
        parallel_content = False

        def digest(self, n: FsNode) -> str:
            self.reads.append(n.path)
            assert isinstance(n.handle, bytes)
            return sha(n.handle)

        def read_chunks(self, n: FsNode) -> Iterator[bytes | memoryview]:
            raise AssertionError("a remote-digest reader's content is never streamed")

    reader = Remote({"disk0": [node(b"/a", 0o755, data=b"a"), node(b"/b", 0o755, data=b"b", digest=sha(b"b"))]})
    result = inventory(reader, workers=4)
    assert [f.sha256 for f in result.files] == [sha(b"a"), sha(b"b")]
    assert reader.reads == [b"/a"]  # /b came with its digest


@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_manifest_path_fast_path_equals_encode_path(raw: bytes) -> None:
    assert manifest_path(raw) == encode_path(raw)
    assert decode_path(manifest_path(raw)) == raw


def test_progress_is_reported_file_by_file_when_hashing_in_the_calling_thread() -> None:
    from hostguard.imagefs.inventory import Progress

    reader = FakeReader({"disk0": [node(b"/bin/%d" % i, 0o755, data=bytes(100 + i)) for i in range(20)]})
    seen: list[Progress] = []
    inventory(reader, workers=1, progress=seen.append, progress_interval=0.0)
    hashing = [p.files_done for p in seen if not p.walking]
    assert len(set(hashing)) > 2 and hashing[-1] == 20  # intermediate counts, not just the start and the end
