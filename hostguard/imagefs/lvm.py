"""LVM2 for the fast reader: physical volumes found on the disks become logical volumes (`lvm:VG:LV`).

dissect.volume parses the PV label, the metadata area header and the metadata text (`LVM2Device`,
`parse_metadata`, `VolumeGroup`). Around it, we check what LVM itself checks before trusting metadata
(the metadata area magic, the text's CRC, bounded sizes, the ring buffer's wrap), pick the newest copy
(highest `seqno`) of each volume group across its PVs, and map each linear LV to byte runs of one disk
image ourselves, so its filesystem is read with `os.pread` like any partition.

Refused with `UnsupportedLayout` (libguestfs reads them): LVs with other segment types (thin, RAID,
mirror, cache, snapshot, striped over several PVs, VDO, ...) and LVs spread over several images. A PV
whose metadata cannot be read, or a VG missing one of its PVs, is an `ImageError` naming it: never a
silent partial inventory.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hostguard.errors import ImageError
from hostguard.imagefs import UnsupportedLayout
from hostguard.imagefs.disk import Segment
from hostguard.imagefs.partitions import Volume
from hostguard.imagefs.xfsfs import VolumeFile
from hostguard.record import Record, field

SECTOR = 512
MDA_MAGIC = b"\x20LVM2\x20x[5A%r0N*>"
MDA_HEADER_SIZE = 512
MAX_METADATA_BYTES = 8 << 20  # lvm.conf's metadata areas are 1 MiB by default; a VG's text is far smaller
MAX_LVS = 4096
MAX_SEGMENTS = 4096
INITIAL_CRC = 0xF597A6CF


def lvm_crc(data: bytes, seed: int = INITIAL_CRC) -> int:
    """LVM's calc_crc: CRC-32 (reflected, 0xEDB88320) from `seed`, no final inversion."""
    return ~zlib.crc32(data, ~seed & 0xFFFFFFFF) & 0xFFFFFFFF


class LogicalVolume(Volume):
    """A linear LV: `runs` are (byte offset in the LV, byte offset in `image`, length), in LV order."""

    vg_name: str = ""
    lv_name: str = ""
    runs: tuple[tuple[int, int, int], ...] = field(default=())

    @property
    def locator(self) -> str:
        return f"lvm:{self.vg_name}:{self.lv_name}"

    @property
    def label(self) -> str:
        return f"{self.image.label} (LVM {self.vg_name}/{self.lv_name})"

    def image_runs(self) -> tuple[tuple[int, int, int], ...]:
        return self.runs

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        self._check(offset, length)
        for lv_off, img_off, size in self.runs:
            if length == 0:
                return
            if offset >= lv_off + size:
                continue
            skip = offset - lv_off
            n = min(size - skip, length)
            yield img_off + skip, n
            offset += n
            length -= n

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.image.read(o, n) for o, n in self._pieces(offset, length))

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        for o, n in self._pieces(offset, length):
            yield from self.image.segments(o, n)


class PhysicalVolume(Record, frozen=False):
    volume: Volume
    uuid: str
    vg_name: str
    seqno: int
    metadata: dict[str, Any]


def _bad(vol: Volume, what: str) -> ImageError:
    return ImageError(f"{vol.label}: LVM2 physical volume: {what}: its logical volumes cannot be read")


def read_pv(vol: Volume) -> PhysicalVolume:
    """The PV label and newest metadata text on `vol`, checked. Every failure names the PV."""
    from dissect.volume.lvm.physical import LVM2Device, parse_metadata

    try:
        dev = LVM2Device(VolumeFile(vol))
        if not dev._metadata_areas:
            raise UnsupportedLayout(f"{vol.label}: LVM2 physical volume without a metadata area")
        mda, locns = dev._metadata_areas[0]
        header = vol.read(mda.start, MDA_HEADER_SIZE) if mda.start + MDA_HEADER_SIZE <= vol.size else b""
        if len(header) < MDA_HEADER_SIZE or header[4:20] != MDA_MAGIC:
            raise _bad(vol, "metadata area header missing")
        if lvm_crc(header[4:]) != struct.unpack_from("<I", header, 0)[0]:
            raise _bad(vol, "metadata area header checksum mismatch")
        if not locns or locns[0].size == 0:
            raise _bad(vol, "no metadata text")
        loc = locns[0]
        if loc.size > MAX_METADATA_BYTES or loc.size > mda.size or loc.offset >= mda.size:
            raise _bad(vol, f"metadata text of {loc.size} bytes at {loc.offset} outside its area")
        # The text is in a ring after the header: it may wrap to the start of the ring.
        first = min(loc.size, mda.size - loc.offset)
        text = vol.read(mda.start + loc.offset, first)
        if first < loc.size:
            text += vol.read(mda.start + MDA_HEADER_SIZE, loc.size - first)
        if lvm_crc(text) != loc.checksum:
            raise _bad(vol, "metadata checksum mismatch")
        meta = _parsed(text, parse_metadata)
        groups = [(k, v) for k, v in meta.items() if isinstance(v, dict)]
        if len(groups) != 1:
            raise _bad(vol, f"{len(groups)} volume groups in one metadata text")
        vg_name, vg = groups[0]
        seqno = vg.get("seqno")
        if not isinstance(seqno, int):
            raise _bad(vol, "metadata without a sequence number")
        return PhysicalVolume(vol, dev.id, vg_name, seqno, meta)
    except ImageError as err:
        if isinstance(err, UnsupportedLayout) or "LVM2 physical volume" in err.message:
            raise
        raise _bad(vol, err.message) from None
    except Exception as err:  # noqa: BLE001 - parser of hostile text: anything it raises means unreadable
        raise _bad(vol, f"malformed metadata ({type(err).__name__}: {err})") from None


_PARSED: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
_PARSED_LOCK = threading.Lock()


def _parsed(text: bytes, parse: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """dissect's parse of a metadata text, remembered by the text itself (a daemon opens the same PVs at every
    check; the parse is most of the cost). Callers only read the result."""
    with _PARSED_LOCK:
        found = _PARSED.get(text)
        if found is not None:
            _PARSED.move_to_end(text)
            return found
    meta = parse(text.rstrip(b"\x00").decode("utf-8"))
    with _PARSED_LOCK:
        _PARSED[text] = meta
        while len(_PARSED) > 16:
            _PARSED.popitem(last=False)
    return meta


def logical_volumes(pvs: Sequence[PhysicalVolume]) -> list[LogicalVolume]:
    """The visible LVs of every VG whose PVs are all present, from the newest metadata of each VG."""
    by_vg: dict[str, list[PhysicalVolume]] = {}
    for pv in pvs:
        by_vg.setdefault(pv.vg_name, []).append(pv)
    out: list[LogicalVolume] = []
    for vg_name in sorted(by_vg):
        members = by_vg[vg_name]
        newest = max(members, key=lambda p: p.seqno)
        try:
            out.extend(_vg_lvs(vg_name, newest, {p.uuid: p for p in members}))
        except (ImageError, UnsupportedLayout):
            raise
        except Exception as err:  # noqa: BLE001 - structure of hostile metadata
            raise _bad(newest.volume, f"malformed volume group {vg_name} ({type(err).__name__}: {err})") from None
    return out


def _vg_lvs(vg_name: str, newest: PhysicalVolume, present: dict[str, PhysicalVolume]) -> list[LogicalVolume]:
    label = newest.volume.label
    vg = newest.metadata[vg_name]
    extent_bytes = int(vg["extent_size"]) * SECTOR
    if extent_bytes <= 0:
        raise _bad(newest.volume, f"volume group {vg_name}: invalid extent size")
    pvs: dict[str, tuple[Volume, int]] = {}
    for pv_name, pv in vg.get("physical_volumes", {}).items():
        uuid = str(pv["id"]).replace("-", "")
        member = present.get(uuid)
        if member is None:
            raise ImageError(
                f"{label}: LVM volume group {vg_name}: physical volume {pv['id']} ({pv.get('device', '?')}) "
                "is not on these disks: its logical volumes cannot be read"
            )
        pvs[pv_name] = (member.volume, int(pv["pe_start"]) * SECTOR)
    lvs = vg.get("logical_volumes", {})
    if len(lvs) > MAX_LVS:
        raise _bad(newest.volume, f"volume group {vg_name}: more than {MAX_LVS} logical volumes")
    out: list[LogicalVolume] = []
    for lv_name in sorted(lvs):
        lv = lvs[lv_name]
        if "VISIBLE" not in lv.get("status", []):
            continue
        out.append(_linear_lv(vg_name, lv_name, lv, pvs=pvs, extent_bytes=extent_bytes, label=label))
    return out


def _linear_lv(
    vg_name: str,
    lv_name: str,
    lv: dict[str, Any],
    *,
    pvs: dict[str, tuple[Volume, int]],
    extent_bytes: int,
    label: str,
) -> LogicalVolume:
    name = f"{vg_name}/{lv_name}"
    segs = sorted((v for v in lv.values() if isinstance(v, dict)), key=lambda s: int(s["start_extent"]))
    if not segs or len(segs) > MAX_SEGMENTS:
        raise ImageError(f"{label}: LVM {name}: {len(segs)} segments")
    runs: list[tuple[int, int, int]] = []
    image = None
    pos = 0
    for seg in segs:
        kind = str(seg["type"])
        stripes = seg.get("stripes", [])
        if kind != "striped" or int(seg.get("stripe_count", 0)) != 1 or len(stripes) != 2:
            raise UnsupportedLayout(f"{label}: LVM {name}: {kind} segments are not readable by the fast reader")
        start, count = int(seg["start_extent"]) * extent_bytes, int(seg["extent_count"]) * extent_bytes
        if start != pos or count <= 0:
            raise ImageError(f"{label}: LVM {name}: segments overlap or leave a gap")
        pv_name, pv_extent = str(stripes[0]), int(stripes[1])
        if pv_name not in pvs:
            raise ImageError(f"{label}: LVM {name}: segment on unknown physical volume {pv_name}")
        vol, pe_start = pvs[pv_name]
        if image is not None and vol.image is not image:
            raise UnsupportedLayout(f"{label}: LVM {name} spans several disks")
        image = vol.image
        inside = pe_start + pv_extent * extent_bytes
        if pv_extent < 0 or inside + count > vol.size:
            raise ImageError(f"{label}: LVM {name}: segment beyond its physical volume")
        runs.append((pos, vol.offset + inside, count))
        pos += count
    assert image is not None
    return LogicalVolume(image, 0, pos, vg_name=vg_name, lv_name=lv_name, runs=tuple(runs))
