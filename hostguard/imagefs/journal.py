"""Replay an ext3/4 (jbd2) journal in memory: which filesystem blocks a mount would overwrite, and with what.

A running guest's ext4 is "needs recovery": committed transactions may sit in the journal and not yet in their
home blocks. The kernel replays them when it mounts the filesystem, so what the guest executes next boot (and
what its page cache was filled from) is the replayed view. `replay_map(fs)` follows the kernel's recovery
(fs/jbd2/recovery.c, do_one_pass): scan from the journal superblock's `s_start`/`s_sequence` while block
headers carry the expected sequence, count only transactions with a commit block, honour revoke records (a
block revoked in transaction T' is not replayed from any transaction T <= T'), and let later transactions win.
Nothing is written: the result maps fs block -> (volume offset of the journal's copy, escaped).

What the kernel does and this mirrors (see docs/adr/0009-journal-replay.md):
* Revoke blocks are read whatever the superblock's `journal_incompat_revoke` bit says: the kernel sets that
  bit in memory when it first revokes and writes the journal superblock only at the next checkpoint, so a
  running guest's log holds revoke blocks under a superblock without the bit. Recovery never looks at it.
* Tags: 8 bytes (32-bit block numbers), 12 (`journal_64bit`), +2 with `journal_checksum_v2`, 16 with v3;
  revoke records 4 or 8 bytes. With v2/v3 every descriptor and revoke block has a 4-byte checksum tail.
* A descriptor or revoke block whose checksum does not match (a stale block left by lazy journal init):
  the next commit block decides, by its commit time, between "stale: the log ends here" and "corrupt: the
  mount fails". A commit block whose checksum does not match ends the log if its time is older than the
  previous commit's (stale), else the kernel marks the transaction failed and what the mount does depends on
  the guest's `errors=` option: that, and a data block whose checksum does not match (the mount fails), is
  refused with `UnsupportedLayout` (the daemon reports "check unavailable"), never a guess.
* `journal_fast_commit`: the normal log wraps before the fast-commit area (`s_num_fc_blks`, default 256,
  at the end of the journal). The area is skipped when the kernel would replay nothing from it (its first
  block is not a fast-commit head of the transaction after the last full commit); when it holds fast commits
  to replay (ext4's logical inode/dentry/range records) the replay is refused, naming the feature.
* Refused by name: `journal_checksum` (v1 transaction checksums), `journal_async_commit`, an external
  journal, unknown features. Scans are bounded by the journal's length, and by `Limits.max_journal_blocks`
  (blocks walked plus revoke records: a longer log is refused, not replayed).
"""

from __future__ import annotations

import bisect
import struct
from typing import TYPE_CHECKING

from hostguard.errors import ImageError
from hostguard.imagefs import UnsupportedLayout
from hostguard.imagefs.crc32c import crc32c_raw

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
# As e2fsprogs names them (dumpe2fs's "Journal features:").
INCOMPAT_NAMES = {
    INCOMPAT_REVOKE: "journal_incompat_revoke",
    INCOMPAT_64BIT: "journal_64bit",
    INCOMPAT_ASYNC_COMMIT: "journal_async_commit",
    INCOMPAT_CSUM_V2: "journal_checksum_v2",
    INCOMPAT_CSUM_V3: "journal_checksum_v3",
    INCOMPAT_FAST_COMMIT: "journal_fast_commit",
}
SUPPORTED_INCOMPAT = INCOMPAT_REVOKE | INCOMPAT_64BIT | INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT
FLAG_ESCAPE = 1
FLAG_SAME_UUID = 2
FLAG_LAST_TAG = 8
CRC32C_CHKSUM = 4
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_INCOMPAT_JOURNAL_DEV = 0x8
SB_NUM_FC_BLKS = 0x54
DEFAULT_FC_BLOCKS = 256  # JBD2_DEFAULT_FAST_COMMIT_BLOCKS
MIN_JOURNAL_BLOCKS = 1024  # JBD2_MIN_JOURNAL_BLOCKS
REVOKE_HEADER = 16  # jbd2_journal_revoke_header_t: the block header + r_count
COMMIT_SEC = 0x30  # commit_header.h_commit_sec
EXT4_FC_TAG_HEAD = 9

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


def feature_names(bits: int) -> str:
    """Journal incompat feature bits as e2fsprogs names them (unknown bits in hex)."""
    names = [name for bit, name in INCOMPAT_NAMES.items() if bits & bit]
    rest = bits & ~sum(INCOMPAT_NAMES)
    if rest:
        names.append(f"unknown {rest:#x}")
    return ", ".join(names)


class _Header:
    """The journal superblock's fields that recovery uses, validated."""

    def __init__(self, j: _Journal) -> None:
        raw = j.block(0)
        magic, btype, _seq = struct.unpack_from(">III", raw, 0)
        if magic != JBD2_MAGIC or btype not in (SB_V1, SB_V2):
            raise ImageError(f"{j.label}: bad journal superblock")
        blocksize, self.maxlen, self.first, self.sequence, self.start = struct.unpack_from(">IIIII", raw, 12)
        compat = incompat = 0
        if btype == SB_V2:
            compat, incompat, _ro = struct.unpack_from(">III", raw, 0x24)
        if blocksize != j.bs:
            raise ImageError(f"{j.label}: journal block size {blocksize} is not the filesystem's {j.bs}")
        if not 0 < self.first < self.maxlen <= j.nblocks:
            raise ImageError(
                f"{j.label}: journal bounds first={self.first} maxlen={self.maxlen} do not fit its {j.nblocks} blocks"
            )
        if incompat & ~SUPPORTED_INCOMPAT:
            raise UnsupportedLayout(
                f"{j.label}: journal feature not supported: {feature_names(incompat & ~SUPPORTED_INCOMPAT)}"
            )
        if compat & COMPAT_CHECKSUM:
            raise UnsupportedLayout(
                f"{j.label}: journal feature not supported: journal_checksum (v1 transaction checksums)"
            )
        self.incompat = incompat
        self.wide = bool(incompat & INCOMPAT_64BIT)
        self.csum_v3 = bool(incompat & INCOMPAT_CSUM_V3)
        self.csum = bool(incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))
        self.seed = 0
        if self.csum:
            if raw[0x50] != CRC32C_CHKSUM:
                raise UnsupportedLayout(f"{j.label}: journal checksum type {raw[0x50]} not supported")
            want = struct.unpack_from(">I", raw, 0xFC)[0]
            if crc32c_raw(0xFFFFFFFF, raw[:0xFC] + b"\0\0\0\0" + raw[0x100:1024]) != want:
                raise UnsupportedLayout(
                    f"{j.label}: journal superblock checksum mismatch (the guest could not mount it)"
                )
            self.seed = crc32c_raw(0xFFFFFFFF, raw[0x30:0x40])
        # The normal log is [first, last); with fast commits the fast-commit area follows it (the kernel's
        # j_last = s_maxlen - s_num_fc_blks, j_fc_first = j_last + 1).
        self.last = self.maxlen
        self.fc_first: int | None = None
        if incompat & INCOMPAT_FAST_COMMIT:
            num_fc = struct.unpack_from(">I", raw, SB_NUM_FC_BLKS)[0] or DEFAULT_FC_BLOCKS
            if num_fc >= self.maxlen or self.maxlen - num_fc < MIN_JOURNAL_BLOCKS:
                raise ImageError(f"{j.label}: {num_fc} fast-commit blocks do not fit a journal of {self.maxlen}")
            self.last = self.maxlen - num_fc
            self.fc_first = self.last + 1
            if not self.first < self.last:
                raise ImageError(f"{j.label}: journal bounds first={self.first} last={self.last}")


class _Transaction:
    """What one transaction of the log holds: (target, journal block, flags, tag checksum) per data block, the
    revoked targets, and the first malformed revoke block (the kernel fails the mount on it if committed)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tags: list[tuple[int, int, int, int]] = []
        self.revokes: list[int] = []
        self.bad_revoke: int | None = None


def _scan(j: _Journal, h: _Header) -> tuple[list[_Transaction], int]:
    """The committed transactions from s_start on, in log order, and the sequence after the last one."""
    bs, csum, wide, csum_v3 = j.bs, h.csum, h.wide, h.csum_v3
    # As the kernel's journal_tag_bytes(): tag3 with csum v3; else 12 bytes, +2 with csum v2, -4 without 64bit.
    tag_bytes = 16 if csum_v3 else 12 + (2 if csum else 0) - (0 if wide else 4)
    tail = 4 if csum else 0
    first, last = h.first, h.last

    def nxt(n: int) -> int:
        n += 1
        return n - (last - first) if n >= last else n

    def tail_ok(block: bytes) -> bool:
        want = struct.unpack_from(">I", block, bs - 4)[0]
        return bool(crc32c_raw(h.seed, block[:-4] + b"\0\0\0\0") == want)

    committed: list[_Transaction] = []
    cur = _Transaction(h.sequence)
    pos, seen, data_blocks, records = h.start, 0, 0, 0
    # What the replay holds and costs grows with the log (see Limits.max_journal_blocks): bounded by the limit,
    # not by the journal's length, which the guest chooses.
    budget = j.fs.limits.max_journal_blocks
    # A descriptor or revoke block whose checksum does not match: the next commit block's time decides.
    need_check = False
    last_time = 0
    while True:
        seen += 1
        if seen > 2 * h.maxlen:
            raise ImageError(f"{j.label}: the log does not end within the journal (loop?)")
        if seen + data_blocks + records > budget:
            raise UnsupportedLayout(
                f"{j.label}: the log to replay is longer than {budget} blocks and revoke records (the bound"
                " max_journal_blocks): not replayed"
            )
        block = j.block(pos)
        magic, btype, bseq = struct.unpack_from(">III", block, 0)
        if magic != JBD2_MAGIC or bseq != cur.seq:
            break  # the end of the log
        if btype == DESCRIPTOR:
            if csum and not tail_ok(block):
                need_check = True
            off, limit = 12, bs - tail
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
                cur.tags.append((target, pos, flags, tag_csum))
                data_blocks += 1
                if data_blocks > h.maxlen:
                    raise ImageError(f"{j.label}: more data blocks than the journal holds")
                off += tag_bytes + (0 if flags & FLAG_SAME_UUID else 16)
                if flags & FLAG_LAST_TAG:
                    break
            pos = nxt(pos)
        elif btype == COMMIT:
            commit_time = struct.unpack_from(">Q", block, COMMIT_SEC)[0]
            if need_check:
                if commit_time >= last_time:
                    raise UnsupportedLayout(
                        f"{j.label}: transaction {cur.seq} has a descriptor or revoke block whose checksum does"
                        " not match (the kernel refuses to mount it)"
                    )
                break  # an older commit time: stale blocks, the log ends before them
            if csum:
                want = struct.unpack_from(">I", block, 16)[0]
                if crc32c_raw(h.seed, block[:16] + b"\0\0\0\0" + block[20:]) != want:
                    if commit_time < last_time:
                        break  # stale: the log ends here
                    # The kernel ends the replay before this transaction and marks it failed; what the mount
                    # then does depends on the guest's errors= option: we do not guess which.
                    raise UnsupportedLayout(f"{j.label}: commit block at journal block {pos}: checksum mismatch")
            if cur.bad_revoke is not None:
                raise ImageError(f"{j.label}: revoke block at journal block {cur.bad_revoke}: bad record size")
            last_time = commit_time
            committed.append(cur)
            cur = _Transaction((cur.seq + 1) & 0xFFFFFFFF)
            pos = nxt(pos)
        elif btype == REVOKE:
            if csum and not tail_ok(block):
                need_check = True
            count = struct.unpack_from(">I", block, 12)[0]
            width = 8 if wide else 4
            if count > bs - tail:
                if cur.bad_revoke is None:
                    cur.bad_revoke = pos
            else:
                for off in range(REVOKE_HEADER, count - width + 1, width):
                    cur.revokes.append(struct.unpack_from(">Q" if wide else ">I", block, off)[0])
                    records += 1
            pos = nxt(pos)
        else:
            break  # an unknown block type ends the scan, as in the kernel
    return committed, cur.seq


def _check_fast_commit_area(j: _Journal, h: _Header, expected_tid: int) -> None:
    """Refuse when ext4 would replay fast commits: the area's first block opens with a fast-commit head for
    the transaction after the last full commit (ext4_fc_replay_scan stops at once otherwise)."""
    if h.fc_first is None:
        return
    if h.fc_first >= h.maxlen:
        raise ImageError(f"{j.label}: the fast-commit area starts past the journal's end")
    block = j.block(h.fc_first)
    tag, length, _features, tid = struct.unpack_from("<HHII", block, 0)
    if tag != EXT4_FC_TAG_HEAD:
        return
    # A head of another transaction is stale (newer kernels stop there, older ones fail the mount): nothing
    # replayed either way. A malformed head fails the mount: refused with the feature named, like a real one.
    if length != 8 or tid == expected_tid:
        raise UnsupportedLayout(
            f"{j.label}: journal feature not supported: journal_fast_commit (fast commits of transaction "
            f"{expected_tid} to replay)"
        )


def replay_map(fs: ExtFilesystem) -> Remap:
    """fs block -> (volume offset of the committed copy in the journal, escaped) for a mount's replay."""
    j = _Journal(fs)
    h = _Header(j)
    if h.start == 0:
        return {}  # nothing to replay: the journal was checkpointed (nor fast commits: the kernel stops here)
    if not h.first <= h.start < h.last:
        raise ImageError(f"{j.label}: journal start {h.start} outside [{h.first}, {h.last})")
    committed, after = _scan(j, h)
    _check_fast_commit_area(j, h, after)

    revoked: dict[int, int] = {}  # target -> the latest transaction revoking it
    for t in committed:
        for target in t.revokes:
            revoked[target] = t.seq
    remap: Remap = {}
    for t in committed:
        for target, jpos, flags, tag_csum in t.tags:
            rseq = revoked.get(target)
            if rseq is not None and not _seq_after(t.seq, rseq):
                continue  # revoked in this transaction or a later one
            if not 0 <= target < fs.block_count:
                raise ImageError(f"{j.label}: replays block {target}, outside the filesystem")
            if h.csum:
                data = j.block(jpos)
                value = crc32c_raw(crc32c_raw(h.seed, struct.pack(">I", t.seq)), data)
                if (value if h.csum_v3 else value & 0xFFFF) != tag_csum:
                    raise UnsupportedLayout(
                        f"{j.label}: data block for fs block {target} in transaction {t.seq}: checksum mismatch"
                    )
            remap[target] = (j.where(jpos), bool(flags & FLAG_ESCAPE))
    return remap


def _seq_after(a: int, b: int) -> bool:
    """jbd2's tid_gt: a is later than b, modulo 2**32."""
    d = (a - b) & 0xFFFFFFFF
    return 0 < d < 0x80000000
