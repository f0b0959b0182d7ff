"""The XFS log of a running (or uncleanly stopped) guest: would the kernel's recovery change what we read?

A mounted XFS writes metadata to its log first and in place later. A guest's disk read while the guest runs
(or after a crash) may hold a change only in the log: reading the blocks in place would then show a state the
guest does not see, and the inventory could miss a file. This module does not replay the log (ADR 0023); it
finds out, as the kernel's recovery does (`fs/xfs/xfs_log_recover.c`), what a replay would write, and
accepts the filesystem only when every such write is already on disk:

1. The head and tail of the log, found as `xlog_find_head`/`xlog_find_tail` find them (cycle numbers,
   binary search, the scan windows, the last record header); an unmount record at the head: clean.
2. Every record between tail and head: its CRC (a torn write at a crash is refused, the kernel would trim
   it), its cycle data restored, its operations gathered into transactions (`xlog_recover_process_data`);
   only committed transactions count, as in recovery.
3. Each item of a committed transaction, with the kernel's skip rules:
   * buffer: skipped if cancelled later in the log (`XFS_BLF_CANCEL`), or if the block on disk carries a
     newer or equal LSN (v5 metadata, `xlog_recover_get_buf_lsn`); otherwise the logged 128-byte chunks
     must already equal the disk. Inode-buffer items (they replay only the unlinked-list pointers, which
     the inventory never reads) and quota buffers do not matter;
   * inode: skipped if cancelled, or if the on-disk v3 inode's LSN is newer; otherwise it would be
     replayed: not clean;
   * inode chunk creation (icreate): would rewrite inode clusters: not clean unless cancelled;
   * intents left without their "done" item: mapping or attribute changes (bmap, exchange, xattr) are
     not clean; extent-free, rmap and refcount intents change only free-space metadata: ignored;
   * quota items: ignored; an unknown item type: refused.

Anything else (a v4 filesystem with a dirty log, an external log, a big-endian log, a malformed log) is
refused: `UnsupportedLayout` naming "xfs log not clean" and why. The daemon reports it as one
`check-unavailable` finding.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hostguard.errors import ImageError
from hostguard.imagefs import UnsupportedLayout
from hostguard.imagefs.crc32c import crc32c_raw
from hostguard.record import Record, field

if TYPE_CHECKING:
    from hostguard.imagefs.xfsfs import XfsFilesystem

BB = 512
HEADER_MAGIC = 0xFEEDBABE
HEADER_CYCLE_SIZE = 32768  # bytes of record data per header block's cycle data (XLOG_HEADER_CYCLE_SIZE)
MAX_ICLOGS = 8
MAX_RECORD_BB = (1 << 18) // BB  # XLOG_MAX_RECORD_BSIZE (v2 logs)
TOTAL_REC_BB = MAX_ICLOGS * MAX_RECORD_BB  # XLOG_TOTAL_REC_SHIFT
REC_HEADER_LEN = 328  # sizeof(struct xlog_rec_header) on x86-64 (324 bytes of fields, padded to 8)
EXT_HEADER_LEN = 260
OP_HEADER_LEN = 12
FMT_LINUX_LE = 1
TRANSACTION, LOG_CLIENT = 0x69, 0xAA
START, COMMIT, CONTINUE, WAS_CONT, END, UNMOUNT = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
TRANS_HEADER_MAGIC = 0x5452414E  # "TRAN"
MAX_REGIONS = 8 * 1024 * 1024 // 128 + 3  # XLOG_MAX_REGIONS_IN_ITEM
MAX_LOG_BYTES = 2 << 30  # XFS logs are at most 2 GiB

LI_EFI, LI_INODE, LI_BUF, LI_DQUOT, LI_QUOTAOFF, LI_ICREATE = 0x1236, 0x123B, 0x123C, 0x123D, 0x123E, 0x123F
# Intent -> done item types. Intents that change file mappings or attributes when recovery finishes them:
MAPPING_INTENTS = {0x1244: "bmap update", 0x1246: "extended attribute", 0x1248: "mapping exchange"}
# Intents that change only free-space, reverse-mapping or reference-count metadata (never read here):
SPACE_INTENTS = {0x1236: "extent free", 0x1240: "rmap", 0x1242: "refcount", 0x124A: "rt extent free",
                 0x124C: "rt rmap", 0x124E: "rt refcount"}  # fmt: skip
DONE_ITEMS = {t + 1 for t in (*MAPPING_INTENTS, *SPACE_INTENTS)}

BLF_INODE_BUF, BLF_CANCEL = 0x1, 0x4
BLF_DQUOT_BUFS = 0x2 | 0x8 | 0x10  # XFS_BLF_UDQUOT_BUF | PDQUOT | GDQUOT
BLF_CHUNK = 128

# Where v5 metadata blocks keep their LSN and UUID (xlog_recover_get_buf_lsn): magic -> (lsn, uuid) offsets.
_SHORT_BTREE = (24, 32)
_LONG_BTREE = (32, 40)
_DIR3 = (16, 24)
LSN_AT_32: dict[int, tuple[int, int] | None] = {
    **dict.fromkeys((0x41423342, 0x41423343, 0x41425442, 0x41425443, 0x524D4233, 0x52334643, 0x46494233,
                     0x46494254, 0x49414233, 0x49414254), _SHORT_BTREE),  # free space, rmap, refcount, inode btrees
    0x424D4133: _LONG_BTREE,  # BMA3
    0x424D4150: _LONG_BTREE,  # BMAP
    0x58414746: (208, 64),  # XAGF
    0x5841464C: (24, 8),  # XAFL
    0x58414749: (320, 296),  # XAGI
    0x58534C4D: (48, 24),  # XSLM (symlink)
    0x58444233: _DIR3, 0x58444433: _DIR3, 0x58444633: _DIR3,  # XDB3, XDD3, XDF3
    0x5841524D: None,  # XARM: remote attribute blocks recover immediately
    0x58465342: (240, -1),  # XFSB: the superblock (UUID: sb_meta_uuid or sb_uuid)
}  # fmt: skip
LSN_AT_16 = {0x3DF1: (24, 32), 0x3DFF: (24, 32), 0x3BEE: (24, 32), 0x3EBE: (24, 32)}  # da3 leaf/node blocks


class LogState(Record, frozen=False):
    """What the log holds. `changes` is empty when a recovery would not change what the reader reads."""

    clean: bool = False  # an unmount record at the head
    cycle: int = 0  # the head record's cycle (1 until the log first wraps)
    head: int = 0
    tail: int = 0
    records: int = 0
    transactions: int = 0
    items: int = 0
    skipped: int = 0  # items the kernel would skip or that would write what the disk holds already
    changes: list[str] = field(default_factory=list)


def _not_clean(fs: XfsFilesystem, why: str) -> UnsupportedLayout:
    return UnsupportedLayout(f"{fs.label}: xfs log not clean: {why}")


class _Log:
    def __init__(self, fs: XfsFilesystem) -> None:
        sb = fs.sb
        self.fs = fs
        if not sb.sb_logstart:
            raise UnsupportedLayout(f"{fs.label}: XFS with an external log device")
        self.start = fs.fs_block(int(sb.sb_logstart), b"<log>") * fs.block_size
        size = int(sb.sb_logblocks) * fs.block_size
        if size < 2 * BB or size > MAX_LOG_BYTES or self.start + size > fs.volume.size:
            raise ImageError(f"{fs.label}: XFS log of {size} bytes outside the volume")
        self.bbs = size // BB
        self.v2 = bool(sb.sb_versionnum & 0x0400)  # XFS_SB_VERSION_LOGV2BIT
        incompat = int(sb.sb_features_incompat) if (sb.sb_versionnum & 0xF) >= 5 else 0
        self.uuid = bytes(sb.sb_meta_uuid if incompat & 0x4 else sb.sb_uuid)
        self.crc = (sb.sb_versionnum & 0xF) >= 5

    def read(self, blk: int, count: int) -> bytes:
        """`count` log blocks from `blk`, wrapping at the end of the log."""
        if count > self.bbs:
            raise ImageError(f"{self.fs.label}: XFS log read of {count} blocks in a log of {self.bbs}")
        blk %= self.bbs
        first = min(count, self.bbs - blk)
        data = self.fs.read(self.start + blk * BB, first * BB)
        if first < count:
            data += self.fs.read(self.start, (count - first) * BB)
        return data

    def cycle(self, blk: int) -> int:
        return self.cycles(blk, 1)[0]

    def cycles(self, start: int, count: int) -> list[int]:
        """xlog_get_cycle of each block: the first word, or a record header's h_cycle (windows of thousands of
        blocks are scanned on every open: the words are picked out in C)."""
        words = array("I", self.read(start, count))
        first, second = words[:: BB // 4], words[1 :: BB // 4]
        if sys.byteorder == "little":
            first.byteswap()
            second.byteswap()
        return [c if f == HEADER_MAGIC else f for f, c in zip(first, second, strict=True)]

    # --- the head (xlog_find_head) -----------------------------------------------------------------------

    def find_cycle_start(self, first: int, last: int, cycle: int) -> int:
        mid = (first + last) >> 1
        while mid not in (first, last):
            if self.cycle(mid) == cycle:
                last = mid
            else:
                first = mid
            mid = (first + last) >> 1
        return last

    def verify_cycle(self, start: int, count: int, stop: int) -> int:
        """The first block in [start, start+count) whose cycle is `stop`, or -1."""
        if count <= 0:
            return -1
        try:
            return start + self.cycles(start, count).index(stop)
        except ValueError:
            return -1

    def hblks(self, header: bytes) -> int:
        version, h_size = struct.unpack_from(">I", header, 8)[0], struct.unpack_from(">I", header, 320)[0]
        if self.v2 and version & 2 and h_size > HEADER_CYCLE_SIZE:
            return int(-(-h_size // HEADER_CYCLE_SIZE))
        return 1

    def verify_log_record(self, start: int, last: int, extra: int) -> tuple[int, int]:
        """(status, new last): status 1 when no record header was found before block 0 (xlog_find_verify_log_record)."""
        i = last - 1
        while i >= 0:
            if i < start:
                raise _not_clean(self.fs, "log inconsistent (no record header before the head)")
            header = self.read(i, 1)
            if struct.unpack_from(">I", header, 0)[0] == HEADER_MAGIC:
                break
            i -= 1
        if i == -1:
            return 1, last
        self.check_header(header)
        h_len = struct.unpack_from(">I", header, 12)[0]
        if last - i + extra != -(-h_len // BB) + self.hblks(header):
            last = i
        return 0, last

    def check_header(self, header: bytes) -> None:
        fmt = struct.unpack_from(">I", header, 300)[0]
        if fmt != FMT_LINUX_LE:
            raise _not_clean(self.fs, f"log written in format {fmt} (only little-endian Linux logs are read)")
        if header[304:320] != bytes(self.fs.sb.sb_uuid):
            raise _not_clean(self.fs, "a log record of another filesystem (UUID differs)")

    def find_zeroed(self) -> int | None:
        if self.cycle(0) == 0:
            return 0
        if self.cycle(self.bbs - 1) != 0:
            return None
        last = self.find_cycle_start(0, self.bbs - 1, 0)
        scan = min(TOTAL_REC_BB, last)
        start = last - scan
        found = self.verify_cycle(start, scan, 0)
        if found != -1:
            last = found
        status, last = self.verify_log_record(start, last, 0)
        if status == 1:
            raise _not_clean(self.fs, "log inconsistent (no record header in a partly zeroed log)")
        return last

    def find_head(self) -> int:
        zeroed = self.find_zeroed()
        if zeroed is not None:
            return zeroed
        first_cycle, last_cycle = self.cycle(0), self.cycle(self.bbs - 1)
        head = self.bbs - 1
        if first_cycle == last_cycle:
            head, stop = self.bbs, last_cycle - 1
        else:
            stop = last_cycle
            head = self.find_cycle_start(0, head, last_cycle)
        scan = min(self.bbs, TOTAL_REC_BB)
        if head >= scan:
            found = self.verify_cycle(head - scan, scan, stop)
            if found != -1:
                head = found
        else:
            found = self.verify_cycle(self.bbs - (scan - head), scan - head, stop - 1)
            if found != -1:
                head = found
            else:
                found = self.verify_cycle(0, head, stop)
                if found != -1:
                    head = found
        scan = MAX_RECORD_BB
        if head >= scan:
            status, head = self.verify_log_record(head - scan, head, 0)
            if status == 1:
                raise _not_clean(self.fs, "log inconsistent (no record header before the head)")
        else:
            status, head = self.verify_log_record(0, head, 0)
            if status == 1:
                status, new = self.verify_log_record(self.bbs - (scan - head), self.bbs, head)
                if status == 1:
                    raise _not_clean(self.fs, "log inconsistent (no record header before the head)")
                if new != self.bbs:
                    head = new
        return 0 if head == self.bbs else head

    def last_header(self, head: int) -> tuple[int, bytes]:
        """The record header before `head` (xlog_rseek_logrec_hdr), searching back around the log once."""
        for n in range(1, self.bbs + 1):
            blk = (head - n) % self.bbs
            header = self.read(blk, 1)
            if struct.unpack_from(">I", header, 0)[0] == HEADER_MAGIC:
                return blk, header
        raise _not_clean(self.fs, "no log record header found")

    # --- records ---------------------------------------------------------------------------------------

    def records(self, tail: int, head: int) -> Iterator[tuple[int, int, bytes]]:
        """(LSN, operation count, unpacked data) of each record from `tail` up to `head`, CRCs checked."""
        blk = tail
        walked = 0
        while blk != head:
            header = self.read(blk, 1)
            if struct.unpack_from(">I", header, 0)[0] != HEADER_MAGIC:
                raise _not_clean(self.fs, f"no record header at log block {blk}")
            self.check_header(header)
            hblks = self.hblks(header)
            h_len = struct.unpack_from(">I", header, 12)[0]
            lsn = struct.unpack_from(">Q", header, 16)[0]
            if h_len <= 0 or h_len > MAX_RECORD_BB * BB or -(-h_len // HEADER_CYCLE_SIZE) > hblks:
                raise _not_clean(self.fs, f"log record at block {blk} of {h_len} bytes")
            nbb = -(-h_len // BB)
            if hblks > 1:
                header = self.read(blk, hblks)
            data = bytearray(self.read(blk + hblks, nbb))
            self.check_crc(blk, header, bytes(data[:h_len]))
            # Restore each block's first word (replaced by the cycle number when written).
            for i in range(nbb):
                j, k = divmod(i, HEADER_CYCLE_SIZE // BB)
                at = 44 + 4 * k if j == 0 else j * BB + 4 + 4 * k
                data[i * BB : i * BB + 4] = header[at : at + 4]
            yield lsn, struct.unpack_from(">I", header, 40)[0], bytes(data[:h_len])
            step = hblks + nbb
            walked += step
            if walked > self.bbs:
                raise _not_clean(self.fs, "log records run past the head")
            blk = (blk + step) % self.bbs

    def check_crc(self, blk: int, header: bytes, data: bytes) -> None:
        want = struct.unpack_from("<I", header, 32)[0]
        if not self.crc and want == 0:
            return
        xheads = -(-len(data) // HEADER_CYCLE_SIZE) if self.v2 else 1  # xlog_cksum: by the data's size
        if xheads * BB > len(header):
            raise _not_clean(self.fs, f"log record at block {blk} lacks its extended headers")
        ext = b"".join(header[i * BB : i * BB + EXT_HEADER_LEN] for i in range(1, xheads))
        for length in (REC_HEADER_LEN, 324):  # 324: a 32-bit kernel's header size
            crc = crc32c_raw(0xFFFFFFFF, header[:32] + b"\0\0\0\0" + header[36:length] + ext + data)
            if crc ^ 0xFFFFFFFF == want:
                return
        raise _not_clean(self.fs, f"log record at block {blk} fails its checksum (torn write)")


class _Item(Record, frozen=False):
    regions: list[bytearray] = field(default_factory=list)
    total: int = 0


class _Trans(Record, frozen=False):
    lsn: int
    header: bytes = b""
    items: list[_Item] = field(default_factory=list)


def transactions(log: _Log, tail: int, head: int, state: LogState) -> list[_Trans]:
    """Committed transactions from tail to head, in commit order (xlog_recover_process_data)."""
    live: dict[int, _Trans] = {}
    done: list[_Trans] = []
    for lsn, num_ops, data in log.records(tail, head):
        state.records += 1
        pos = 0
        left = num_ops
        while pos < len(data) and left:
            left -= 1
            if pos + OP_HEADER_LEN > len(data):
                raise _not_clean(log.fs, "truncated log operation header")
            tid, length, client, flags = struct.unpack_from(">IIBB", data, pos)
            pos += OP_HEADER_LEN
            body = data[pos : pos + length]
            if len(body) != length:
                raise _not_clean(log.fs, "log operation beyond its record")
            pos += length
            if client not in (TRANSACTION, LOG_CLIENT):
                raise _not_clean(log.fs, f"log operation of client {client:#x}")
            trans = live.get(tid)
            if trans is None:
                if flags & START:
                    live[tid] = _Trans(lsn)
                continue
            kind = flags & ~END
            if kind & WAS_CONT:
                kind &= ~CONTINUE
            if kind in (0, CONTINUE):
                _add(log, trans, body)
            elif kind == WAS_CONT:
                _add_cont(log, trans, body)
            elif kind == COMMIT:
                done.append(live.pop(tid))
            elif kind == UNMOUNT:
                live.pop(tid)
            else:
                raise _not_clean(log.fs, f"log operation with flags {flags:#x}")
    state.transactions = len(done)
    return done


def _add(log: _Log, trans: _Trans, body: bytes) -> None:
    if not body:
        return
    if not trans.header:
        if len(body) < 4 or struct.unpack_from("<I", body, 0)[0] != TRANS_HEADER_MAGIC or len(body) > 16:
            raise _not_clean(log.fs, "log transaction without its header")
        trans.header = body
        return
    item = trans.items[-1] if trans.items else None
    if item is None or (item.total and len(item.regions) == item.total):
        item = _Item()
        trans.items.append(item)
    if not item.total:
        if len(body) < 4:
            raise _not_clean(log.fs, "truncated log item")
        item.total = struct.unpack_from("<H", body, 2)[0]
        if not 0 < item.total <= MAX_REGIONS:
            raise _not_clean(log.fs, f"log item of {item.total} regions")
    if len(item.regions) >= item.total:
        raise _not_clean(log.fs, "log item with more regions than it declares")
    item.regions.append(bytearray(body))


def _add_cont(log: _Log, trans: _Trans, body: bytes) -> None:
    if not trans.items:
        if not trans.header:
            raise _not_clean(log.fs, "continued log transaction header")
        trans.header += body
        return
    trans.items[-1].regions[-1] += body


# --- the items: would the replay change anything? ------------------------------------------------------------


def _lsn_key(lsn: int) -> tuple[int, int]:
    return lsn >> 32, lsn & 0xFFFFFFFF


def _buf_lsn(log: _Log, block: bytes) -> int:
    """xlog_recover_get_buf_lsn: the on-disk block's LSN, or -1 to recover it regardless."""
    if len(block) < 64 or not log.crc:
        return -1
    magic = struct.unpack_from(">I", block, 0)[0]
    where = LSN_AT_32[magic] if magic in LSN_AT_32 else LSN_AT_16.get(struct.unpack_from(">H", block, 8)[0])
    if where is None or len(block) < where[0] + 8:
        return -1
    lsn_at, uuid_at = where
    if uuid_at == -1:  # the superblock
        incompat = struct.unpack_from(">I", block, 216)[0]
        uuid = block[248:264] if incompat & 0x4 else block[32:48]
    else:
        uuid = block[uuid_at : uuid_at + 16]
    if uuid != log.uuid:
        return -1
    return int(struct.unpack_from(">Q", block, lsn_at)[0])


def _chunks(bitmap: bytes) -> Iterator[tuple[int, int]]:
    """(first chunk, count) runs of set bits in a buffer item's dirty bitmap (32-bit host-endian words)."""
    bits = [(w >> b) & 1 for (w,) in struct.iter_unpack("<I", bitmap) for b in range(32)]
    i = 0
    while i < len(bits):
        if bits[i]:
            j = i
            while j < len(bits) and bits[j]:
                j += 1
            yield i, j - i
            i = j
        else:
            i += 1


def _buffer_changes(log: _Log, lsn: int, item: _Item) -> str | None:
    fmt = item.regions[0]
    if len(fmt) < 20:
        raise _not_clean(log.fs, "truncated buffer log item")
    flags, length, blkno, map_size = struct.unpack_from("<HHqI", fmt, 4)
    if flags & (BLF_INODE_BUF | BLF_DQUOT_BUFS):
        return None  # unlinked-list pointers or quota: nothing the inventory reads
    size = length * BB
    if blkno < 0 or length == 0 or (blkno * BB + size) > log.fs.volume.size:
        raise _not_clean(log.fs, f"buffer log item for blocks {blkno}+{length} outside the filesystem")
    if 20 + map_size * 4 > len(fmt):
        raise _not_clean(log.fs, "truncated buffer log item bitmap")
    disk = log.fs.read(blkno * BB, size)
    on_disk = _buf_lsn(log, disk)
    if on_disk not in (0, -1) and _lsn_key(on_disk) >= _lsn_key(lsn):
        return None  # written back since: the kernel skips it
    region = 1
    for first, count in _chunks(bytes(fmt[20 : 20 + map_size * 4])):
        if region >= len(item.regions):
            raise _not_clean(log.fs, "buffer log item with fewer regions than its bitmap")
        data = item.regions[region]
        region += 1
        start, n = first * BLF_CHUNK, count * BLF_CHUNK
        if len(data) < n or start + n > size:
            raise _not_clean(log.fs, "buffer log item region outside its buffer")
        if disk[start : start + n] != bytes(data[:n]):
            return f"metadata block {blkno} (daddr) not yet written in place"
    return None


def _inode_changes(log: _Log, lsn: int, item: _Item, cancelled: dict[tuple[int, int], int]) -> str | None:
    fmt = item.regions[0]
    if len(fmt) not in (52, 56):
        raise _not_clean(log.fs, f"inode log item of {len(fmt)} bytes")
    ino = struct.unpack_from("<Q", fmt, 16 if len(fmt) == 56 else 12)[0]
    blkno, length, boffset = struct.unpack_from("<qii", fmt, len(fmt) - 16)
    if cancelled.get((blkno, length)):
        return None
    if blkno < 0 or boffset < 0 or blkno * BB + boffset + 256 > log.fs.volume.size:
        raise _not_clean(log.fs, f"inode log item for inode {ino} outside the filesystem")
    raw = log.fs.read(blkno * BB + boffset, 256)
    if raw[:2] != b"IN":
        return f"inode {ino}: on disk not yet an inode"
    if raw[4] >= 3:
        on_disk = struct.unpack_from(">Q", raw, 0x70)[0]
        if on_disk not in (0, 2**64 - 1) and _lsn_key(on_disk) > _lsn_key(lsn):
            return None
    return f"inode {ino} logged and not written in place since"


def assess(fs: XfsFilesystem) -> LogState:
    """The log's state (see the module docstring); raises `UnsupportedLayout` for what is not handled."""
    log = _Log(fs)
    state = LogState()
    head = log.find_head()
    rblk, rhead = log.last_header(head)
    log.check_header(rhead)
    tail = struct.unpack_from(">Q", rhead, 24)[0] & 0xFFFFFFFF
    if tail >= log.bbs:
        raise _not_clean(fs, f"log tail {tail} outside the log")
    state.head, state.tail, state.cycle = head, tail, struct.unpack_from(">I", rhead, 4)[0]
    # xlog_check_unmount_rec: a record holding only an unmount operation, ending at the head.
    hblks = log.hblks(rhead)
    h_len, num_ops = struct.unpack_from(">I", rhead, 12)[0], struct.unpack_from(">I", rhead, 40)[0]
    after = (rblk + hblks + -(-h_len // BB)) % log.bbs
    if after == head and num_ops == 1:
        op = log.read(rblk + hblks, 1)
        if op[9] & UNMOUNT:
            state.clean = True
            state.tail = head
            return state
    if tail == head:
        return state
    if not log.crc:
        raise _not_clean(fs, "a v4 (no CRC) XFS log that needs recovery is not read")
    done = transactions(log, tail, head, state)
    cancelled: dict[tuple[int, int], int] = {}
    for trans in done:
        for item in trans.items:
            if _is_cancel(item):
                if len(item.regions[0]) < 16:
                    raise _not_clean(fs, "truncated buffer log item")
                _, length, blkno = struct.unpack_from("<HHq", item.regions[0], 4)
                cancelled[(blkno, length)] = cancelled.get((blkno, length), 0) + 1
    open_intents: dict[tuple[int, int], str] = {}
    for trans in done:
        # xlog_recover_reorder_trans: a transaction's buffer cancellations are processed after its other items.
        for item in sorted(trans.items, key=_is_cancel):
            state.items += 1
            why = _item_changes(log, trans.lsn, item, cancelled, open_intents)
            if why is None:
                state.skipped += 1
            else:
                state.changes.append(why)
    state.changes += [f"unfinished {name} intent" for name in open_intents.values()]
    return state


def _is_cancel(item: _Item) -> bool:
    fmt = item.regions[0] if item.regions else b""
    return len(fmt) >= 6 and struct.unpack_from("<HHH", fmt, 0)[0] == LI_BUF and bool(fmt[4] & BLF_CANCEL)


def _item_changes(
    log: _Log, lsn: int, item: _Item, cancelled: dict[tuple[int, int], int], intents: dict[tuple[int, int], str]
) -> str | None:
    if not item.regions or len(item.regions[0]) < 4:
        raise _not_clean(log.fs, "empty log item")
    fmt = item.regions[0]
    kind = struct.unpack_from("<H", fmt, 0)[0]
    if kind == LI_BUF:
        flags, length, blkno = struct.unpack_from("<HHq", fmt, 4)
        key = (blkno, length)
        if flags & BLF_CANCEL:
            cancelled[key] -= 1
            if not cancelled[key]:
                del cancelled[key]
            return None  # xlog_put_buffer_cancelled: later items of this buffer replay again
        if cancelled.get(key):
            return None
        return _buffer_changes(log, lsn, item)
    if kind == LI_INODE:
        return _inode_changes(log, lsn, item, cancelled)
    if kind == LI_ICREATE:
        return "inode chunk allocation (icreate) to replay"
    if kind in (LI_DQUOT, LI_QUOTAOFF):
        return None
    if kind in MAPPING_INTENTS or kind in SPACE_INTENTS or kind in DONE_ITEMS:
        if len(fmt) < 16:
            raise _not_clean(log.fs, "truncated intent log item")
        ident = struct.unpack_from("<Q", fmt, 8)[0]
        if kind in DONE_ITEMS:
            intents.pop((kind - 1, ident), None)
        elif kind in MAPPING_INTENTS:
            intents[(kind, ident)] = MAPPING_INTENTS[kind]
        return None  # a space intent changes nothing the inventory reads
    raise _not_clean(log.fs, f"log item of unknown type {kind:#x}")


class _CleanLogs:
    """Logs found clean (an unmount record at the head), keyed by where their bytes come from.

    A clean log's state depends on its own bytes and the superblock's description of it only, so a reader
    opened again on unchanged bytes (the signed base, an overlay that writes nothing in the log: every check
    of a read-only guest) need not find the head again (a 2 MiB scan). Logs needing recovery are never kept:
    their state also depends on metadata blocks elsewhere."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[tuple[object, ...], LogState] = OrderedDict()
        self.lock = threading.Lock()

    def key(self, fs: XfsFilesystem) -> tuple[object, ...] | None:
        sb = fs.sb
        start = fs.fs_block(int(sb.sb_logstart), b"<log>") * fs.block_size if sb.sb_logstart else 0
        size = int(sb.sb_logblocks) * fs.block_size
        if not start or start + size > fs.volume.size:
            return None
        parts: list[object] = [bytes(sb.sb_uuid), int(sb.sb_versionnum), start, size]
        for at, where, n in fs.volume.image_runs():  # the log's bytes on the image, run by run
            lo, hi = max(start, at), min(start + size, at + n)
            if lo < hi:
                ident = fs.volume.image.content_identity(where + lo - at, hi - lo)
                if ident is None:
                    return None
                parts += [where + lo - at, hi - lo, ident]
        return tuple(parts)

    def get(self, key: tuple[object, ...]) -> LogState | None:
        with self.lock:
            return self.items.get(key)

    def put(self, key: tuple[object, ...], state: LogState) -> None:
        with self.lock:
            self.items[key] = state
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_clean_logs = _CleanLogs(64)


def check_log(fs: XfsFilesystem) -> LogState:
    """`assess`, refusing (UnsupportedLayout, "xfs log not clean") when a recovery would change what is read."""
    key = _clean_logs.key(fs)
    found = _clean_logs.get(key) if key is not None else None
    if found is not None:
        return found
    state = assess(fs)
    if state.clean and key is not None:
        _clean_logs.put(key, state)
    if state.changes:
        shown = "; ".join(state.changes[:3])
        more = f" (and {len(state.changes) - 3} more)" if len(state.changes) > 3 else ""
        raise _not_clean(fs, f"recovery would replay {len(state.changes)} change(s): {shown}{more}")
    return state
