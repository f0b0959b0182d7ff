"""The fast host-side reader: raw/qcow2 images, whole-disk or MBR/GPT-partitioned, linear LVM2 logical
volumes, ext2/3/4, XFS and single-device Btrfs filesystems (LVM: `imagefs.lvm`, XFS: `imagefs.xfsfs`, ADR 0017;
Btrfs: `imagefs.btrfsfs`, one filesystem per subvolume, ADR 0022).

It refuses (`UnsupportedLayout`, so "auto" falls back on libguestfs) anything it cannot read completely:
another filesystem or container (vfat, multi-device Btrfs, non-linear LVM, LUKS, RAID, ...), a volume with
content it does not recognise, an ext journal that needs recovery (unless `replay_journal=True`: then it is
replayed in memory, see `imagefs.journal`), an XFS log whose recovery would change what is read ("xfs log not
clean", `imagefs.xfslog`, ADR 0023), ext features it does not implement. Swap and all-zero volumes are skipped, as
libguestfs skips them. A disk set with no filesystem at all is an `ImageError`. Besides image files, it reads
disks the caller opened, e.g. a qcow2 backing chain (`imagefs.chain`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hostguard.errors import ImageError
from hostguard.imagefs import (
    DEFAULT_LIMITS,
    FilesystemInfo,
    FsNode,
    GuestFilesystemReader,
    ImageSpec,
    Limits,
    NodeKind,
    UnsupportedLayout,
)
from hostguard.imagefs.btrfsfs import BtrfsSubvolume, open_subvolumes
from hostguard.imagefs.disk import ContentPlan, DiskImage, open_disk
from hostguard.imagefs.extfs import ExtFilesystem
from hostguard.imagefs.lvm import LogicalVolume, PhysicalVolume, logical_volumes, read_pv
from hostguard.imagefs.partitions import BIOS_BOOT_GPT_TYPE, Volume, describe, probe, volumes
from hostguard.imagefs.xfsfs import XfsFilesystem

__all__ = ["FastReader", "UnsupportedLayout"]


class FastReader(GuestFilesystemReader):
    name = "fast"
    parallel_content = True

    def __init__(
        self,
        specs: Sequence[ImageSpec] = (),
        *,
        limits: Limits = DEFAULT_LIMITS,
        disks: Sequence[DiskImage] = (),
        replay_journal: bool = False,
    ) -> None:
        """Open `specs`, or read `disks` that the caller opened (e.g. `imagefs.chain.ChainImage`); the reader
        closes them either way. `replay_journal`: read an ext filesystem whose journal needs recovery as
        the kernel would mount it (replayed in memory) instead of refusing it."""
        super().__init__(limits)
        self._disks: list[DiskImage] = list(disks)
        self._fs: dict[str, tuple[FilesystemInfo, ExtFilesystem | XfsFilesystem | BtrfsSubvolume]] = {}
        self._count = [0]
        self._pvs: list[PhysicalVolume] = []
        self.replay_journal = replay_journal
        try:
            for index, spec in enumerate(specs):
                self._disks.append(open_disk(spec, index))
            for disk in self._disks:
                self._scan(disk)
            for lv in logical_volumes(self._pvs):
                self._add(lv)
            if not self._fs:
                names = ", ".join(d.label for d in self._disks)
                raise ImageError(f"{names}: no filesystem found (corrupt or empty image?)")
        except BaseException:
            self.close()
            raise

    def _scan(self, disk: DiskImage) -> None:
        for vol in volumes(disk):
            self._add(vol)

    def _add(self, vol: Volume) -> None:
        kind = probe(vol)
        if kind == "ext":
            fs = ExtFilesystem(vol, self.limits, replay_journal=self.replay_journal)
            self._fs[vol.locator] = (fs.info(), fs)
        elif kind == "xfs":
            xfs = XfsFilesystem(vol, self.limits)
            self._fs[vol.locator] = (xfs.info(), xfs)
        elif kind == "btrfs":
            for sub in open_subvolumes(vol, self.limits):
                self._fs[sub.locator] = (sub.info(), sub)
        elif kind == "LVM2_member" and not isinstance(vol, LogicalVolume):
            self._pvs.append(read_pv(vol))
        elif kind == "swap":
            return
        elif kind == "empty":
            if vol.linux_data_type:
                raise ImageError(f"{vol.label}: Linux filesystem partition holds no filesystem (corrupt?)")
        elif kind == "unknown":
            if vol.gpt_type == BIOS_BOOT_GPT_TYPE:
                return
            if vol.linux_data_type:
                raise ImageError(f"{vol.label}: Linux filesystem partition holds no filesystem superblock (corrupt?)")
            raise UnsupportedLayout(f"{vol.label}: unrecognised content: {describe(kind)}")
        else:
            raise UnsupportedLayout(f"{vol.label}: {describe(kind)} is not readable by the fast reader")

    def filesystems(self) -> tuple[FilesystemInfo, ...]:
        return tuple(info for info, _ in self._fs.values())

    def ext(self, fs: FilesystemInfo) -> ExtFilesystem:
        """The ext filesystem behind `fs` (for callers that need more than the reader interface)."""
        found = self._fs[fs.locator][1]
        if not isinstance(found, ExtFilesystem):
            raise ImageError(f"{fs.device}: {fs.fstype}, not ext: no block-level index")
        return found

    def indexed_filesystem(self, fs: FilesystemInfo) -> ExtFilesystem | XfsFilesystem:
        """The filesystem object behind `fs`, for the incremental index (`imagefs.indexing`): ext or XFS."""
        found = self._fs[fs.locator][1]
        if isinstance(found, BtrfsSubvolume):
            raise ImageError(f"{fs.device}: btrfs: no incremental index for this filesystem type")
        return found

    def read_file(self, fs: FilesystemInfo, path: bytes, limit: int) -> bytes | None:
        import stat

        found = self._fs[fs.locator][1]
        if isinstance(found, XfsFilesystem):
            node = found.lookup(path)
            if node is None or not stat.S_ISREG(node.inode.di_mode):
                return None
            return found.read_all(node, path, limit)
        if isinstance(found, BtrfsSubvolume):
            entry = found.lookup(path)
            if entry is None or not stat.S_ISREG(entry.mode):
                return None
            return found.read_all(entry, path, limit)
        inode = found.lookup(path)
        if inode is None or not stat.S_ISREG(inode.mode):
            return None
        return found.read_all(inode, path, limit)

    def walk(self, fs: FilesystemInfo) -> Iterator[FsNode]:
        for node, _inode in self._fs[fs.locator][1].walk(self._count):
            yield node

    def read_chunks(self, node: FsNode) -> Iterator[bytes | memoryview]:
        if node.kind is not NodeKind.FILE or not isinstance(node.handle, tuple):
            raise ImageError(f"fast reader: {node.path!r} is not a regular file from this reader")
        locator, inode = node.handle
        return self._fs[locator][1].read_chunks(inode, node.path)

    def content_plan(self, node: FsNode, max_segments: int) -> ContentPlan | None:
        if node.kind is not NodeKind.FILE or not isinstance(node.handle, tuple):
            return None
        locator, inode = node.handle
        fs = self._fs[locator][1]
        segments = fs.content_segments(inode, node.path, max_segments)
        return None if segments is None else ContentPlan(fs.volume.image, segments)

    def close(self) -> None:
        for disk in self._disks:
            disk.close()
        self._disks = []
