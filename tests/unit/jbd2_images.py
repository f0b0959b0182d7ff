"""A small jbd2 log writer for the journal-replay tests: any journal shape on a real ext4 image made by mkfs.ext4
(32/64-bit tags, checksum v2/v3 tails, revoke blocks with or without the revoke bit, a fast-commit area, a log
that wraps, stale blocks), laid out as fs/jbd2/commit.c and revoke.c write them. e2fsck's own replay
(`e2fsck -E journal_only`) is the oracle the tests compare hostguard's replay with."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from hostguard.imagefs import DEFAULT_LIMITS, ImageSpec
from hostguard.imagefs.crc32c import crc32c_raw
from hostguard.imagefs.disk import open_disk
from hostguard.imagefs.extfs import ExtFilesystem
from hostguard.imagefs.journal import (
    COMMIT,
    DESCRIPTOR,
    FLAG_ESCAPE,
    FLAG_LAST_TAG,
    FLAG_SAME_UUID,
    INCOMPAT_64BIT,
    INCOMPAT_CSUM_V2,
    INCOMPAT_CSUM_V3,
    INCOMPAT_FAST_COMMIT,
    JBD2_MAGIC,
    REVOKE,
    _Journal,
)
from hostguard.imagefs.partitions import volumes
from tests.unit.diskcheck_images import debugfs
from tests.unit.inventory_images import run, sparse_copy

MAGIC_BYTES = struct.pack(">I", JBD2_MAGIC)


@dataclass
class Txn:
    """One transaction: fs block -> new content, revoked fs blocks, commit time. `commit=False`: no commit
    block (interrupted); `bad_descriptor`/`bad_revoke`/`bad_commit`: that block's checksum is wrong."""

    blocks: dict[int, bytes] = field(default_factory=dict)
    revokes: list[int] = field(default_factory=list)
    commit_time: int = 1000
    commit: bool = True
    bad_descriptor: bool = False
    bad_revoke: bool = False
    bad_commit: bool = False


def open_fs(image: Path, *, replay: bool = True) -> ExtFilesystem:
    disk = open_disk(ImageSpec(image, "raw"), 0)
    return ExtFilesystem(volumes(disk)[0], DEFAULT_LIMITS, replay_journal=replay)


class LogWriter:
    def __init__(self, image: Path, incompat: int, *, num_fc: int | None = None, fc_head_tid: int | None = None):
        self.image = image
        self.incompat = incompat
        fs = open_fs(image, replay=False)
        self.journal = _Journal(fs)
        self.bs = fs.block_size
        self.jsb = bytearray(self.journal.block(0))
        self.maxlen, self.first = struct.unpack_from(">II", self.jsb, 0x10)
        self.num_fc = num_fc
        fc_blocks = num_fc or struct.unpack_from(">I", self.jsb, 0x54)[0] or 256  # as mkfs.ext4 left it
        self.last = self.maxlen - fc_blocks if incompat & INCOMPAT_FAST_COMMIT else self.maxlen
        self.fc_head_tid = fc_head_tid
        self.csum_v3 = bool(incompat & INCOMPAT_CSUM_V3)
        self.csum = bool(incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))
        self.wide = bool(incompat & INCOMPAT_64BIT)
        self.seed = crc32c_raw(0xFFFFFFFF, bytes(self.jsb[0x30:0x40]))
        self.writes: list[tuple[int, bytes]] = []

    def _header(self, btype: int, seq: int) -> bytearray:
        block = bytearray(self.bs)
        struct.pack_into(">III", block, 0, JBD2_MAGIC, btype, seq)
        return block

    def _tail(self, block: bytearray, bad: bool) -> bytes:
        if self.csum:
            struct.pack_into(">I", block, self.bs - 4, 0)
            struct.pack_into(">I", block, self.bs - 4, crc32c_raw(self.seed, bytes(block)) ^ (1 if bad else 0))
        return bytes(block)

    def _put(self, pos: int, data: bytes) -> int:
        self.writes.append((pos, data))
        pos += 1
        return self.first if pos >= self.last else pos

    def write(self, txns: list[Txn], *, start: int, sequence: int) -> None:
        jsb = self.jsb
        struct.pack_into(">II", jsb, 0x18, sequence, start)
        struct.pack_into(">III", jsb, 0x24, 0, self.incompat, 0)
        if self.csum:
            jsb[0x50] = 4
        if self.num_fc is not None:
            struct.pack_into(">I", jsb, 0x54, self.num_fc)
        if self.csum:
            struct.pack_into(">I", jsb, 0xFC, 0)
            struct.pack_into(">I", jsb, 0xFC, crc32c_raw(0xFFFFFFFF, bytes(jsb[:1024])))
        self.writes = [(0, bytes(jsb))]
        pos, seq = start, sequence
        for t in txns:
            pos = self._transaction(t, pos, seq)
            seq = (seq + 1) & 0xFFFFFFFF
        self.writes.append((pos, bytes(self.bs)))  # the end of the log
        if self.fc_head_tid is not None:
            head = bytearray(self.bs)
            struct.pack_into("<HHII", head, 0, 9, 8, 0, self.fc_head_tid)
            self.writes.append((self.last + 1, bytes(head)))
        with self.image.open("r+b") as fh:
            for n, data in self.writes:
                fh.seek(self.journal.where(n))
                fh.write(data)
        debugfs(self.image, ["feature needs_recovery"])

    def _transaction(self, t: Txn, pos: int, seq: int) -> int:
        bs = self.bs
        if t.blocks:
            desc = self._header(DESCRIPTOR, seq)
            off = 12
            items = sorted(t.blocks.items())
            data: list[bytes] = []
            for i, (target, content) in enumerate(items):
                flags = (FLAG_SAME_UUID if i else 0) | (FLAG_LAST_TAG if i == len(items) - 1 else 0)
                if content[:4] == MAGIC_BYTES:
                    flags |= FLAG_ESCAPE
                    content = bytes(4) + content[4:]
                # Over the copy as written (escaped), as jbd2_block_tag_csum_set computes it.
                value = crc32c_raw(crc32c_raw(self.seed, struct.pack(">I", seq)), content)
                if self.csum_v3:
                    struct.pack_into(">IIII", desc, off, target & 0xFFFFFFFF, flags, target >> 32, value)
                    off += 16
                else:
                    struct.pack_into(">IHH", desc, off, target & 0xFFFFFFFF, value & 0xFFFF if self.csum else 0, flags)
                    if self.wide:
                        struct.pack_into(">I", desc, off + 8, target >> 32)
                    off += 8 + (4 if self.wide else 0) + (2 if self.csum else 0)
                if not flags & FLAG_SAME_UUID:
                    off += 16  # the journal's UUID (zero, as for an internal journal)
                assert off <= bs - (4 if self.csum else 0)
                data.append(content)
            pos = self._put(pos, self._tail(desc, t.bad_descriptor))
            for content in data:
                pos = self._put(pos, content)
        if t.revokes:
            rev = self._header(REVOKE, seq)
            width = 8 if self.wide else 4
            for i, target in enumerate(t.revokes):
                struct.pack_into(">Q" if self.wide else ">I", rev, 16 + i * width, target)
            struct.pack_into(">I", rev, 12, 16 + len(t.revokes) * width)
            pos = self._put(pos, self._tail(rev, t.bad_revoke))
        if t.commit:
            commit = self._header(COMMIT, seq)
            struct.pack_into(">QI", commit, 0x30, t.commit_time, 0)
            if self.csum:
                struct.pack_into(">I", commit, 16, crc32c_raw(self.seed, bytes(commit)) ^ (1 if t.bad_commit else 0))
            pos = self._put(pos, bytes(commit))
        return pos


def e2fsck_replayed(image: Path) -> bytes:
    copy = image.with_suffix(".replayed")
    sparse_copy(image, copy)
    run("e2fsck", "-p", "-E", "journal_only", copy)
    return copy.read_bytes()


def assert_matches_e2fsck(image: Path) -> ExtFilesystem:
    """Every block but the superblock's and the journal's reads as after e2fsck's replay."""
    fs = open_fs(image)
    reference = e2fsck_replayed(image)
    bs = fs.block_size
    journal = _Journal(fs)
    skip = {0, 1 if bs == 1024 else 0, *(journal.where(n) // bs for n in range(journal.nblocks))}
    for block in range(fs.block_count):
        if block not in skip:
            assert fs.read(block * bs, bs) == reference[block * bs : (block + 1) * bs], f"block {block}"
    return fs
