"""Replay an ext3/4 (jbd2) journal in memory: which filesystem blocks a mount would overwrite, and with what.

A running guest's ext4 is "needs recovery": committed transactions may sit in the journal and not yet in their
home blocks. The kernel replays them when it mounts the filesystem, so what the guest executes next boot (and
what its page cache was filled from) is the replayed view. `replay_map(fs)` follows the kernel's recovery
(fs/jbd2/recovery.c): scan from the journal superblock's `s_start`/`s_sequence` while block headers carry
the expected sequence, count only transactions with a commit block, honour revoke records (a block revoked in
transaction T' is not replayed from any transaction T <= T'), and let later transactions win. Nothing is
written: the result maps fs block -> (volume offset of the journal's copy, escaped).

The guest wrote this journal: it is hostile input. Where the kernel's behaviour depends on details that are
hard to mirror exactly (a checksum that does not match, asynchronous commits, fast commits, v1 transaction
checksums, an external journal), we refuse with `UnsupportedLayout`, which the daemon reports as "check
unavailable": never a guess that could pass a tampered disk. Scans are bounded by the journal's length.
"""

from __future__ import annotations

import bisect
import struct
from typing import TYPE_CHECKING

from hostguard.errors import ImageError
from hostguard.imagefs import UnsupportedLayout

if TYPE_CHECKING:
    from hostguard.imagefs.extfs import ExtFilesystem

JBD2_MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5
COMPAT_CHECKSUM = 0x1
INCOMPAT_REVOKE = 0x1
INCOMPAT_64BIT = 0x2
INCOMPAT_ASYNC_COMMIT = 0x4
INCOMPAT_CSUM_V2 = 0x8
INCOMPAT_CSUM_V3 = 0x10
INCOMPAT_FAST_COMMIT = 0x20
SUPPORTED_INCOMPAT = INCOMPAT_REVOKE | INCOMPAT_64BIT | INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3
FLAG_ESCAPE = 1
FLAG_SAME_UUID = 2
FLAG_LAST_TAG = 8
CRC32C_CHKSUM = 4
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_INCOMPAT_JOURNAL_DEV = 0x8

Remap = dict[int, tuple[int, bool]]


class _Journal:
    def __init__(self, fs: ExtFilesystem) -> None:
        self.fs = fs
        self.label = f"{fs.label}: journal"
        sb = fs.sb
        if fs.incompat & EXT_INCOMPAT_JOURNAL_DEV:
            raise UnsupportedLayout(f"{fs.label}: an external journal device, not a filesystem")
        inum = int(sb.s_journal_inum)
        if not sb.s_feature_compat & EXT_COMPAT_HAS_JOURNAL or inum == 0:
            raise UnsupportedLayout(f"{fs.label}: needs recovery from a journal that is not inside the filesystem")
        inode = fs.inode(inum, b"<journal>")
        self.bs: int = fs.block_size
        # Journal block n lives at volume offset runs[k][1] + (n - runs[k][0]) * bs (None: a hole).
        self.starts: list[int] = []
        self.offsets: list[int | None] = []
        logical = 0
        for offset, length in fs.blockmap.content_runs(inode, b"<journal>"):
            self.starts.append(logical)
            self.offsets.append(offset)
            logical += -(-length // self.bs)
        self.nblocks = logical

    def where(self, n: int) -> int:
        if not 0 <= n < self.nblocks:
            raise ImageError(f"{self.label}: block {n} is outside the journal ({self.nblocks} blocks)")
        k = bisect.bisect_right(self.starts, n) - 1
        base = self.offsets[k]
        if base is None:
            raise ImageError(f"{self.label}: block {n} is a hole in the journal inode")
        return base + (n - self.starts[k]) * self.bs

    def block(self, n: int) -> bytes:
        return self.fs.volume.read(self.where(n), self.bs)


def _crc(seed: int, data: bytes) -> int:
    from hostguard.imagefs.extfs import _crc32c_raw

    value: int = _crc32c_raw(seed, data)
    return value


def replay_map(fs: ExtFilesystem) -> Remap:
    """fs block -> (volume offset of the committed copy in the journal, escaped) for a mount's replay."""
    j = _Journal(fs)
    raw = j.block(0)
    magic, btype, _seq = struct.unpack_from(">III", raw, 0)
    if magic != JBD2_MAGIC or btype not in (SB_V1, SB_V2):
        raise ImageError(f"{j.label}: bad journal superblock")
    blocksize, maxlen, first, sequence, start = struct.unpack_from(">IIIII", raw, 12)
    compat = incompat = 0
    if btype == SB_V2:
        compat, incompat, _ro = struct.unpack_from(">III", raw, 0x24)
    if blocksize != j.bs:
        raise ImageError(f"{j.label}: journal block size {blocksize} is not the filesystem's {j.bs}")
    if not 0 < first < maxlen <= j.nblocks:
        raise ImageError(f"{j.label}: journal bounds first={first} maxlen={maxlen} do not fit its {j.nblocks} blocks")
    if incompat & ~SUPPORTED_INCOMPAT:
        raise UnsupportedLayout(f"{j.label}: journal features {incompat & ~SUPPORTED_INCOMPAT:#x} not supported")
    if compat & COMPAT_CHECKSUM:
        raise UnsupportedLayout(f"{j.label}: v1 transaction checksums are not supported")
    csum_v3 = bool(incompat & INCOMPAT_CSUM_V3)
    csum = bool(incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))
    seed = 0
    if csum:
        if raw[0x50] != CRC32C_CHKSUM:
            raise UnsupportedLayout(f"{j.label}: journal checksum type {raw[0x50]} not supported")
        want = struct.unpack_from(">I", raw, 0xFC)[0]
        if _crc(0xFFFFFFFF, raw[:0xFC] + b"\0\0\0\0" + raw[0x100:1024]) != want:
            raise UnsupportedLayout(f"{j.label}: journal superblock checksum mismatch (the guest could not mount it)")
        seed = _crc(0xFFFFFFFF, raw[0x30:0x40])
    if start == 0:
        return {}  # nothing to replay: the journal was checkpointed
    if not first <= start < maxlen:
        raise ImageError(f"{j.label}: journal start {start} outside [{first}, {maxlen})")

    wide = bool(incompat & INCOMPAT_64BIT)
    # As the kernel's journal_tag_bytes(): tag3 with csum v3; else 12 bytes, +2 with csum v2, -4 without 64bit.
    tag_bytes = 16 if csum_v3 else 12 + (2 if csum else 0) - (0 if wide else 4)
    tail = 4 if csum else 0

    def nxt(n: int) -> int:
        n += 1
        return first if n >= maxlen else n

    def check_tail(block: bytes, what: str, pos: int) -> None:
        want = struct.unpack_from(">I", block, j.bs - 4)[0]
        if _crc(seed, block[:-4] + b"\0\0\0\0") != want:
            raise UnsupportedLayout(f"{j.label}: {what} at journal block {pos}: checksum mismatch")

    # One scan collects every committed transaction: (sequence, [(target, journal block, flags, tag csum)],
    # [revoked targets]).
    committed: list[tuple[int, list[tuple[int, int, int, int]], list[int]]] = []
    tags: list[tuple[int, int, int, int]] = []
    revokes: list[int] = []
    pos, seq, seen = start, sequence, 0
    while True:
        seen += 1
        if seen > 2 * maxlen:
            raise ImageError(f"{j.label}: the log does not end within the journal (loop?)")
        block = j.block(pos)
        magic, btype, bseq = struct.unpack_from(">III", block, 0)
        if magic != JBD2_MAGIC or bseq != seq:
            break  # the end of the log
        if btype == DESCRIPTOR:
            if csum:
                check_tail(block, "descriptor block", pos)
            off, limit = 12, j.bs - tail
            while off + tag_bytes <= limit:
                target = struct.unpack_from(">I", block, off)[0]
                flags = struct.unpack_from(">H", block, off + 6)[0]
                if wide:
                    target |= struct.unpack_from(">I", block, off + 8)[0] << 32
                if csum_v3:
                    tag_csum = struct.unpack_from(">I", block, off + 12)[0]
                elif csum:
                    tag_csum = struct.unpack_from(">H", block, off + 4)[0]
                else:
                    tag_csum = 0
                pos = nxt(pos)
                tags.append((target, pos, flags, tag_csum))
                if len(tags) > maxlen:
                    raise ImageError(f"{j.label}: more data blocks than the journal holds")
                off += tag_bytes + (0 if flags & FLAG_SAME_UUID else 16)
                if flags & FLAG_LAST_TAG:
                    break
            pos = nxt(pos)
        elif btype == COMMIT:
            if csum:
                want = struct.unpack_from(">I", block, 16)[0]
                if _crc(seed, block[:16] + b"\0\0\0\0" + block[20:]) != want:
                    # The kernel ends the replay before this transaction or fails the mount, depending on
                    # commit times: we do not guess which.
                    raise UnsupportedLayout(f"{j.label}: commit block at journal block {pos}: checksum mismatch")
            committed.append((seq, tags, revokes))
            tags, revokes = [], []
            seq = (seq + 1) & 0xFFFFFFFF
            pos = nxt(pos)
        elif btype == REVOKE:
            if not incompat & INCOMPAT_REVOKE:
                raise ImageError(f"{j.label}: revoke block in a journal without the revoke feature")
            if csum:
                check_tail(block, "revoke block", pos)
            count = struct.unpack_from(">I", block, 12)[0]
            width = 8 if wide else 4
            if count < 16 or count > j.bs - tail:
                raise ImageError(f"{j.label}: revoke block at journal block {pos}: bad record size {count}")
            for off in range(16, count - width + 1, width):
                revokes.append(struct.unpack_from(">Q" if wide else ">I", block, off)[0])
            pos = nxt(pos)
        else:
            break  # an unknown block type ends the scan, as in the kernel

    revoked: dict[int, int] = {}  # target -> the latest transaction revoking it
    for tseq, _tags, revs in committed:
        for target in revs:
            revoked[target] = tseq
    remap: Remap = {}
    for tseq, ttags, _revs in committed:
        for target, jpos, flags, tag_csum in ttags:
            rseq = revoked.get(target)
            if rseq is not None and not _seq_after(tseq, rseq):
                continue  # revoked in this transaction or a later one
            if not 0 <= target < fs.block_count:
                raise ImageError(f"{j.label}: replays block {target}, outside the filesystem")
            if csum:
                data = j.block(jpos)
                value = _crc(_crc(seed, struct.pack(">I", tseq)), data)
                if (value if csum_v3 else value & 0xFFFF) != tag_csum:
                    raise UnsupportedLayout(
                        f"{j.label}: data block for fs block {target} in transaction {tseq}: checksum mismatch"
                    )
            remap[target] = (j.where(jpos), bool(flags & FLAG_ESCAPE))
    return remap


def _seq_after(a: int, b: int) -> bool:
    """jbd2's tid_gt: a is later than b, modulo 2**32."""
    d = (a - b) & 0xFFFFFFFF
    return 0 < d < 0x80000000
