"""What a signed initrd contributes to a running guest: the kernel modules it can load and the first pages
of the ELF files it holds (they stay in memory after switch_root until the pages are reused).

An initrd is a sequence of newc cpio archives, each uncompressed or compressed (Debian: an uncompressed
early archive with CPU microcode, then a compressed main archive). Parsed as a stream (bounded entries,
name and file sizes), never unpacked to disk; only the first page of ELF files is kept.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from hostguard.errors import FormatError
from hostguard.memory.judge import module_name
from hostguard.record import Record
from hostguard.signed.manifest import encode_path

PAGE = 4096
MAX_ENTRIES = 200_000
MAX_NAME = 4096
MAX_FILE = 1 << 30
MAX_PADDING = 1 << 20
CPIO_MAGICS = (b"070701", b"070702")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class InitrdContents(Record):
    modules: frozenset[str]  # kernel spelling (underscores)
    elf_heads: frozenset[str]  # sha256 of the first page (zero-padded) of each ELF file
    files: frozenset[str] = frozenset()  # absolute paths of its regular files (manifest encoding)


def _read_exact(r: IO[bytes], n: int) -> bytes:
    data = r.read(n)
    if len(data) != n:
        raise FormatError("initrd: truncated cpio archive")
    return data


def _skip(r: IO[bytes], n: int) -> None:
    while n > 0:
        chunk = r.read(min(n, 1 << 20))
        if not chunk:
            raise FormatError("initrd: truncated cpio archive")
        n -= len(chunk)


def _archive(r: IO[bytes], first: bytes, budget: list[int]) -> Iterator[tuple[str, bytes]]:
    """(name, first page) of each regular file of one newc archive whose 6-byte magic was `first`."""
    magic = first
    while True:
        if magic not in CPIO_MAGICS:
            raise FormatError("initrd: bad cpio header")
        hdr = _read_exact(r, 104)
        try:
            fields = [int(hdr[i : i + 8], 16) for i in range(0, 104, 8)]
        except ValueError:
            raise FormatError("initrd: cpio header is not hex") from None
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        if not 0 < namesize <= MAX_NAME or filesize > MAX_FILE:
            raise FormatError("initrd: cpio entry too large")
        budget[0] -= 1
        if budget[0] < 0:
            raise FormatError(f"initrd: more than {MAX_ENTRIES} entries")
        name = _read_exact(r, namesize).rstrip(b"\0")
        _skip(r, -(110 + namesize) % 4)
        if name == b"TRAILER!!!":
            return
        head = b""
        if filesize:
            head = _read_exact(r, min(filesize, PAGE))
            _skip(r, filesize - len(head))
            _skip(r, -filesize % 4)
        if mode & 0o170000 == 0o100000:
            yield name.decode("utf-8", "surrogateescape"), head
        magic = _read_exact(r, 6)


def _open_compressed(raw: BinaryIO, stack: ExitStack) -> IO[bytes]:
    magic = raw.read(6)
    raw.seek(-len(magic), 1)
    if magic.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
    if magic.startswith(b"\xfd7zXZ\x00") or magic.startswith(b"\x5d\x00\x00"):
        return stack.enter_context(lzma.LZMAFile(raw, "rb"))
    if magic.startswith(b"BZh"):
        return stack.enter_context(bz2.BZ2File(raw, "rb"))
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        tool = shutil.which("zstd")
        if tool is None:
            raise FormatError("initrd: zstd compressed archive needs the zstd tool")
        os.lseek(raw.fileno(), raw.tell(), os.SEEK_SET)  # the tool reads the fd: align it with our buffer
        proc: Any = stack.enter_context(
            subprocess.Popen([tool, "-dcq"], stdin=raw.fileno(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        )
        stack.callback(proc.kill)
        return proc.stdout  # type: ignore[no-any-return]
    raise FormatError(f"initrd: unknown archive format (magic {magic.hex()})")


def read_initrd(path: Path) -> InitrdContents:
    modules: set[str] = set()
    heads: set[str] = set()
    files: set[str] = set()
    budget = [MAX_ENTRIES]

    def take(entries: Iterator[tuple[str, bytes]]) -> None:
        for name, head in entries:
            raw = name.encode("utf-8", "surrogateescape")
            raw = (raw[2:] if raw.startswith(b"./") else raw).lstrip(b"/")
            if raw:
                files.add(encode_path(b"/" + raw))
            base = name.rsplit("/", 1)[-1]
            for suffix in MODULE_SUFFIXES:
                if base.endswith(suffix):
                    modules.add(module_name(base[: -len(suffix)]))
            if head.startswith(b"\x7fELF"):
                heads.add(hashlib.sha256(head.ljust(PAGE, b"\0")).hexdigest())

    try:
        with path.open("rb") as raw, ExitStack() as stack:
            while True:
                # uncompressed archives (and the zero padding between them), then at most one compressed rest
                pad = 0
                byte = raw.read(1)
                while byte == b"\0" and pad < MAX_PADDING:
                    pad += 1
                    byte = raw.read(1)
                if not byte:
                    break
                raw.seek(-1, 1)
                magic = raw.read(6)
                if magic in CPIO_MAGICS:
                    take(_archive(raw, magic, budget))
                    continue
                raw.seek(-len(magic), 1)
                stream = _open_compressed(raw, stack)
                while True:
                    word = stream.read(4)  # archives and their padding are 4-byte aligned
                    if len(word) < 4:
                        break
                    if word != b"\0\0\0\0":
                        take(_archive(stream, word + _read_exact(stream, 2), budget))
                break
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise FormatError(f"initrd {path.name}: cannot read ({type(err).__name__}: {err})") from None
    return InitrdContents(frozenset(modules), frozenset(heads), frozenset(files))
