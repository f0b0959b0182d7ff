"""The layer tar of a pulled image, unpacked while it is downloaded: a strict streaming reader that writes the
disk (and the kernel-boot files) straight to their files, written back as they arrive. ADR 0015, 0034."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostguard.errors import FormatError
from hostguard.host.libc import libc
from hostguard.library.ocilayer import BLOCK, CHUNK, ThreadHash

BOOT_ROLES = {"boot/vmlinuz": "kernel", "boot/initrd": "initrd"}
WRITE_PIECE = 256 << 10  # bytes per write(2): see write_all


def member_name(name: str) -> str:
    return name.removeprefix("./").rstrip("/")


def sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    """sync_file_range(2) on these bytes. Best effort: speed only (the fsync at the end makes them durable)."""
    fn = getattr(libc(), "sync_file_range", None)
    if fn is not None:
        if fn.argtypes is None:
            import ctypes

            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn(fd, offset, length, flags)


WRITEBACK_STEP = 32 << 20
START_WRITE, WAIT_WRITTEN = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


def write_all(fd: int, data: memoryview) -> None:
    """Write every byte (a short write would leave the file short of what was hashed), at most WRITE_PIECE per
    write(2): on this host's kernel (6.18, ext4) 1 MiB writes cost 4-6x the system time of 256 KiB ones for the
    same bytes (docs/benchmarks.md, "OCI pull")."""
    while len(data):
        data = data[os.write(fd, data[:WRITE_PIECE]) :]


class Unpacker:
    """A strict streaming reader of the layer tar: directories, at most `disk/<one file>`, `boot/vmlinuz` and
    `boot/initrd`, PAX headers; anything else (links, devices, other paths, a second disk, data after the end
    of the archive) fails the pull. Bytes before the disk's data are kept in `prefix` so that a resumed pull
    can replay them; the disk's data goes straight to its file."""

    def __init__(self, work: Path, *, prefix_out: bool = True) -> None:
        self.work = work
        self.buf = bytearray()
        self.pax: dict[str, str] = {}
        self.state = "header"
        self.remaining = 0
        self.pad = 0
        self.role = ""
        self.out: int | None = None
        self.disk_name: str | None = None
        self.disk_size = 0
        self.disk_hash = ThreadHash()
        self.files: dict[str, Path] = {}
        self.zero_blocks = 0
        self.prefix = open(work / "prefix", "wb") if prefix_out else None  # noqa: SIM115 - closed in close()
        self.pax_size = 0
        self.written = self.flushed = self.waited = 0

    def close(self) -> None:
        self.disk_hash.close()
        if self.out is not None:
            os.close(self.out)
            self.out = None
        if self.prefix is not None:
            self.prefix.close()
            self.prefix = None

    def feed(self, data: memoryview) -> None:
        while len(data):
            if self.state == "data":
                n = min(len(data), self.remaining)
                part = data[:n]
                if self.role == "image":
                    self.disk_hash.update(part)
                else:
                    self._keep(part)
                assert self.out is not None
                write_all(self.out, part)
                self.written += n
                if self.written - self.flushed >= WRITEBACK_STEP:
                    self._write_back()
                self.remaining -= n
                data = data[n:]
                if self.remaining == 0:
                    self._end_member()
            elif self.state in ("pad", "skip"):
                n = min(len(data), self.remaining)
                self._keep(data[:n])
                if self.state == "skip":
                    self.buf += data[:n]
                self.remaining -= n
                data = data[n:]
                if self.remaining == 0:
                    if self.state == "skip":
                        self._parse_pax(bytes(self.buf[: self.pax_size]))
                        self.buf.clear()
                    self.state = "header"
            else:
                n = min(len(data), BLOCK - len(self.buf))
                self._keep(data[:n])
                self.buf += data[:n]
                data = data[n:]
                if len(self.buf) == BLOCK:
                    block = bytes(self.buf)
                    self.buf.clear()
                    self._header(block)

    def _write_back(self) -> None:
        """The image must be on disk before it takes its library name. Write it back as it arrives: start the
        step just written and wait for the one before, so that at most two steps (64 MiB) are dirty. The fsync
        at the end then has one step left, and a multi-GiB pull never fills the host's page cache with dirty
        pages that the guests' own writes would queue behind (no faster on this test host: docs/benchmarks.md)."""
        assert self.out is not None
        sync_range(self.out, self.flushed, self.written - self.flushed, START_WRITE)
        if self.flushed > self.waited:
            sync_range(self.out, self.waited, self.flushed - self.waited, WAIT_WRITTEN)
            self.waited = self.flushed
        self.flushed = self.written

    def _keep(self, part: memoryview) -> None:
        if self.prefix is not None:
            self.prefix.write(part)

    def replay_disk(self, path: Path, length: int, layer_update: Callable[[bytes], Any]) -> None:
        """Re-hash the first `length` bytes of the disk file a previous run wrote (the resume's re-check:
        they pass to the layer check and the disk digest), then continue writing after them."""
        assert self.state == "data" and self.role == "image" and self.out is not None
        with path.open("rb") as fh:
            done = 0
            while done < length and (chunk := fh.read(min(CHUNK, length - done))):
                self.disk_hash.update(chunk)
                layer_update(chunk)
                done += len(chunk)
        if done != length:
            raise FormatError("the partial download changed while it was re-checked")
        os.lseek(self.out, length, os.SEEK_SET)
        self.written = self.flushed = self.waited = length  # file offsets: write-back continues from here
        self.remaining -= length
        if self.remaining == 0:
            self._end_member()

    def _header(self, block: bytes) -> None:
        if self.state == "end":
            if block.strip(b"\0"):
                raise FormatError("layer has data after the end of its tar archive")
            return
        if not block.strip(b"\0"):
            self.zero_blocks += 1
            if self.zero_blocks == 2:
                self.state = "end"
            return
        if self.zero_blocks:
            raise FormatError("layer tar has a lone zero block")
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except (tarfile.HeaderError, UnicodeDecodeError) as exc:
            raise FormatError(f"layer tar header is invalid: {exc}") from None
        if info.type == tarfile.XHDTYPE:
            if info.size > 64 * 1024:
                raise FormatError("layer tar PAX header is too large")
            self.state, self.remaining, self.pax_size = "skip", info.size + (-info.size) % BLOCK, info.size
            if self.remaining == 0:
                self.state = "header"
            return
        name = member_name(self.pax.pop("path", info.name))
        size = int(self.pax.pop("size", info.size))
        self.pax.clear()
        if info.type == tarfile.DIRTYPE and name in ("disk", "boot", ""):
            return
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise FormatError(f"layer tar member {name!r} is not a regular file or directory")
        if name in BOOT_ROLES:
            role = BOOT_ROLES[name]
        elif name.startswith("disk/") and "/" not in name[5:] and name[5:] not in ("", ".", ".."):
            role = "image"
            if self.disk_name is not None:
                raise FormatError("layer tar holds more than one disk image")
            self.disk_name, self.disk_size = name, size
        else:
            raise FormatError(f"layer tar member {name!r} is not disk/<image>, boot/vmlinuz or boot/initrd")
        if role in self.files:
            raise FormatError(f"layer tar holds {name!r} twice")
        self.files[role] = self.work / role
        self.out = os.open(self.files[role], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.role, self.remaining, self.pad = role, size, (-size) % BLOCK
        self.written = self.flushed = self.waited = 0
        if role == "image" and self.prefix is not None:
            self.prefix.close()
            self.prefix = None
        self.state = "data"
        if size == 0:
            self._end_member()

    def _end_member(self) -> None:
        assert self.out is not None
        os.fsync(self.out)
        os.close(self.out)
        self.out = None
        self.state, self.remaining = ("pad", self.pad) if self.pad else ("header", 0)

    def _parse_pax(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            sp = data.find(b" ", pos)
            if sp < 0:
                raise FormatError("layer tar PAX record is malformed")
            try:
                length = int(data[pos:sp])
                key, _, value = data[sp + 1 : pos + length - 1].decode("utf-8").partition("=")
            except (ValueError, UnicodeDecodeError):
                raise FormatError("layer tar PAX record is malformed") from None
            if length <= 0 or data[pos + length - 1 : pos + length] != b"\n":
                raise FormatError("layer tar PAX record is malformed")
            if key in ("path", "size"):
                if key == "size" and not value.isdigit():
                    raise FormatError("layer tar PAX size is not a number")
                self.pax[key] = value
            pos += length

    def finish(self) -> None:
        if self.state != "end":
            raise FormatError("layer tar ends before its end-of-archive blocks")
        if self.disk_name is None:
            raise FormatError("layer tar holds no disk/ image")
