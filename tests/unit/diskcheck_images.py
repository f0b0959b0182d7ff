"""Images for the disk-content stage's unit tests: a base ext4, changes made with debugfs, and overlays that
hold exactly those changes, written by QEMU's own qemu-io (or only in the journal, as a running guest leaves
them). No VM, no mount: seconds per image.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hostguard.imagefs import ImageSpec
from hostguard.imagefs.chain import LayerRecord, open_chain
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.inventory import inventory
from hostguard.signed.manifest import FileEntry
from tests.unit.inventory_images import make_ext, run, sparse_copy, to_qcow2, write_tree


def layer(path: Path, fmt: str) -> LayerRecord:
    st = os.stat(path)
    return LayerRecord(path, fmt, st.st_dev, st.st_ino)


def debugfs(image: Path, commands: list[str]) -> str:
    """Run debugfs commands read-write on an image; any complaint on stderr (beyond its banner) fails."""
    proc = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands).encode(), capture_output=True, check=False
    )
    complaints = [line for line in proc.stderr.decode(errors="replace").splitlines() if not line.startswith("debugfs ")]
    if proc.returncode != 0 or complaints:
        raise RuntimeError(f"debugfs {commands}: {complaints or proc.returncode}")
    return proc.stdout.decode(errors="replace")


def block_size(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, check=True, text=True).stdout
    return int(next(line.split()[-1] for line in out.splitlines() if line.startswith("Block size:")))


def diff_ranges(a: bytes, b: bytes, unit: int) -> list[tuple[int, int]]:
    """(offset, length) of the unit-aligned pieces where b differs from a, merged."""
    out: list[tuple[int, int]] = []
    for off in range(0, max(len(a), len(b)), unit):
        if a[off : off + unit] != b[off : off + unit]:
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + unit)
            else:
                out.append((off, unit))
    return out


def qemu_io_write(image: Path, fmt: str, data: bytes, ranges: list[tuple[int, int]], scratch: Path) -> None:
    """Write data[offset:offset+length] for each range into `image` through qemu-io (QEMU's block layer)."""
    qemu_io_write_pieces(image, fmt, [(off, data[off : off + n]) for off, n in ranges], scratch)


def qemu_io_write_pieces(image: Path, fmt: str, pieces: list[tuple[int, bytes]], scratch: Path) -> None:
    """Write each (offset, bytes) into `image` through qemu-io."""
    commands: list[str] = []
    for i, (off, data) in enumerate(pieces):
        piece = scratch / f"piece-{i}"
        piece.write_bytes(data)
        commands += ["-c", f"write -q -s {piece} {off} {len(data)}"]
    for start in range(0, len(commands), 200):
        run("qemu-io", "-f", fmt, *commands[start : start + 200], image)
    for i in range(len(pieces)):
        (scratch / f"piece-{i}").unlink()


def _data_spans(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of a file's data (SEEK_DATA/SEEK_HOLE); the rest reads as zeros."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole after pos
            break
        end = os.lseek(fd, pos, os.SEEK_HOLE)
        out.append((pos, end))
        pos = end
    return out


def diff_files(a: Path, b: Path, unit: int) -> tuple[list[tuple[int, int]], list[bytes]]:
    """`diff_ranges` of the two files' bytes, and b's bytes in each range, reading only where either file
    has data or where their sizes differ (elsewhere both read as zeros: no difference there)."""
    with a.open("rb") as fa, b.open("rb") as fb:
        ia, ib = fa.fileno(), fb.fileno()
        la, lb = os.fstat(ia).st_size, os.fstat(ib).st_size
        spans = _data_spans(ia, la) + _data_spans(ib, lb)
        if la != lb:
            spans.append((min(la, lb), max(la, lb)))
        chunk = unit * 4096
        starts: list[int] = []
        for s, e in sorted(spans):
            for c in range(s // chunk * chunk, e, chunk):  # aligned chunks that hold any of it
                if not starts or starts[-1] < c:
                    starts.append(c)
        ranges: list[tuple[int, int]] = []
        for c in starts:
            da, db = os.pread(ia, chunk, c), os.pread(ib, chunk, c)  # short at the end, as a slice would be
            for off in range(c, c + max(len(da), len(db)), unit):
                if da[off - c : off - c + unit] != db[off - c : off - c + unit]:
                    if ranges and ranges[-1][0] + ranges[-1][1] == off:
                        ranges[-1] = (ranges[-1][0], ranges[-1][1] + unit)
                    else:
                        ranges.append((off, unit))
        pieces = [os.pread(ib, n, off) for off, n in ranges]
    return ranges, pieces


def overlay_with(base_qcow2: Path, base_raw: Path, target_raw: Path, out: Path, *, unit: int = 4096) -> Path:
    """A qcow2 overlay on `base_qcow2` whose view equals `target_raw`: only the differing units are written."""
    out.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base_qcow2, out)
    ranges, pieces = diff_files(base_raw, target_raw, unit)
    if ranges:
        qemu_io_write_pieces(out, "qcow2", list(zip([off for off, _ in ranges], pieces, strict=True)), out.parent)
    return out


def journaled(base_raw: Path, target_raw: Path, out: Path, *, csum: bool = False) -> list[int]:
    """`out` = the base with target's changed blocks committed to the journal only (needs recovery), as a
    guest that crashed (or still runs) leaves it. Returns the journaled block numbers."""
    bs = block_size(base_raw)
    a, b = base_raw.read_bytes(), target_raw.read_bytes()
    blocks = [off // bs for off, n in diff_ranges(a, b, bs) for off in range(off, off + n, bs)]
    sparse_copy(base_raw, out)
    if blocks:
        data = out.with_suffix(".jdata")
        data.write_bytes(b"".join(b[x * bs : (x + 1) * bs] for x in blocks))
        debugfs(out, ["jo -c" if csum else "jo", f"jw -b {','.join(map(str, blocks))} {data}", "jc"])
        data.unlink()
    return blocks


@dataclass
class BaseImage:
    dir: Path
    raw: Path
    qcow2: Path
    tree: Path

    def copy(self, name: str) -> Path:
        dest = self.dir / f"{name}.raw"
        sparse_copy(self.raw, dest)
        return dest

    def changed(self, name: str, commands: list[str]) -> Path:
        """A raw copy of the base changed by debugfs `commands`."""
        dest = self.copy(name)
        if commands:
            debugfs(dest, commands)
        return dest

    def overlay(self, name: str, target_raw: Path, *, unit: int = 4096) -> Path:
        return overlay_with(self.qcow2, self.raw, target_raw, self.dir / f"{name}.qcow2", unit=unit)


def make_base(directory: Path, *, options: tuple[str, ...] = ()) -> BaseImage:
    directory.mkdir(parents=True, exist_ok=True)
    tree = directory / "tree"
    write_tree(tree, big_mib=1)
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc" / "fstab").write_text("LABEL=root / ext4 defaults 0 1\n")
    raw = make_ext(tree, directory / "base.raw", options=("-L", "root", *options))
    return BaseImage(directory, raw, to_qcow2(raw, directory / "base.qcow2"), tree)


def full_inventory_raw(raw: Path) -> tuple[FileEntry, ...]:
    """The oracle: a full inventory of a plain raw image (journal replayed where needed)."""
    with FastReader([ImageSpec(raw, "raw")], replay_journal=True) as reader:
        return inventory(reader).files


def view_reader(top: Path, base: Path) -> FastReader:
    return FastReader(disks=[open_chain([layer(top, "qcow2"), layer(base, "qcow2")])], replay_journal=True)
