"""Initrd contents: module names and ELF first pages from (compressed, concatenated) newc archives."""

from __future__ import annotations

import bz2
import lzma
from pathlib import Path

import pytest

from hostguard.errors import FormatError
from hostguard.memory import initrd as initrdmod
from hostguard.memory.elfscan import head_page_sha256
from hostguard.memory.initrd import read_initrd
from tests.unit.memory_fakes import cpio_newc, elf_header, gz

REG = 0o100644
PROG = elf_header(2, fill=b"a program" * 1000)
LIB = elf_header(3, fill=b"a library")


def main_archive() -> bytes:
    return cpio_newc(
        [
            ("bin", b"", 0o040755),
            ("bin/busybox", PROG, 0o100755),
            ("lib/libc.so.6", LIB, REG),
            ("lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko", b"\x7fELF\x02\x01\x01" + bytes(60), REG),
            ("lib/modules/6.1.0/kernel/fs/fuse/fuse.ko.xz", b"xz data", REG),
            ("lib/modules/6.1.0/kernel/net/dash-name.ko.zst", b"zstd data", REG),
            ("init", b"#!/bin/sh\n", 0o100755),
            ("bin/sh", b"busybox", 0o120777),  # a symlink: not a file
        ]
    )


def test_plain_gzip_initrd(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(gz(main_archive()))
    contents = read_initrd(path)
    assert contents.modules == {"virtio_blk", "fuse", "dash_name"}
    assert head_page_sha256(PROG) in contents.elf_heads and head_page_sha256(LIB) in contents.elf_heads
    assert {"/bin/busybox", "/lib/libc.so.6"} <= contents.files and "/bin" not in contents.files  # regular files


def test_file_paths_are_absolute_whatever_the_archive_spelling(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(cpio_newc([("./init", b"#!/bin/sh", 0o100755), ("/sbin/x", b"", REG), (".profile", b"", REG)]))
    assert read_initrd(path).files == {"/init", "/sbin/x", "/.profile"}


@pytest.mark.parametrize(
    "compress", [gz, lzma.compress, bz2.compress, lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)]
)
def test_early_uncompressed_archive_then_compressed_main(tmp_path: Path, compress: object) -> None:
    early = cpio_newc([("kernel/x86/microcode/GenuineIntel.bin", b"ucode", REG)])
    assert callable(compress)
    path = tmp_path / "initrd.img"
    path.write_bytes(early + bytes(512) + compress(main_archive() + bytes(1024) + cpio_newc([("extra.ko", b"", REG)])))
    contents = read_initrd(path)
    assert contents.modules == {"virtio_blk", "fuse", "dash_name", "extra"}
    assert len(contents.elf_heads) == 3


def test_uncompressed_only(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(main_archive())
    assert read_initrd(path).modules == {"virtio_blk", "fuse", "dash_name"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"070701" + b"zz" * 52, "not hex"),
        (b"garbage that is no archive", "unknown archive format"),
        (cpio_newc([("a", b"x" * 100, REG)])[:150], "truncated"),
        (b"070701" + b"0" * 8 * 11 + b"FFFFFFFF" + b"0" * 8, "too large"),
        (gz(main_archive())[:300], "cannot read"),
        (gz(main_archive())[:-8] + b"broken!!", "cannot read"),
    ],
)
def test_malformed_initrds(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message):
        read_initrd(path)


def test_entry_count_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(initrdmod, "MAX_ENTRIES", 5)
    path = tmp_path / "initrd.img"
    path.write_bytes(cpio_newc([(f"f{i}", b"", REG) for i in range(10)]))
    with pytest.raises(FormatError, match="more than 5 entries"):
        read_initrd(path)


def test_the_test_bed_initrd(tmp_path: Path) -> None:

    from tests.testbed import content, guests

    guest = guests.busybox_guest(content.kernel_version())  # cached; built here when it is not yet
    contents = read_initrd(guest.initrd)
    assert {"virtio_blk", "ext4", "qemu_fw_cfg"} <= contents.modules
