"""The libguestfs reader: the guest's own kernel drivers, inside libguestfs's appliance VM, read-only.

Nothing is mounted on the host: filesystems are mounted (read-only) inside the appliance. Images are
validated like the fast reader's (no qcow2 backing/data file, no encryption, no raw image that looks like
qcow2) and handed to QEMU as `/proc/<our pid>/fd/<n>` of the descriptor that was validated, so the file
cannot be swapped between the check and QEMU opening it.

Appliance round trips are slow and hashing inside it runs on an emulated CPU, so the walk is done in bulk:
one `find0` per filesystem, `lstatnslist` and `lxattrlist` per directory, `pread` of the first bytes only
for regular files without an x bit (the ELF check), and `checksum` only for components (each content once).
The Python binding passes paths as UTF-8 text, so a name that is not valid UTF-8 cannot be named in a call:
such entries (and everything below them) are read instead from a `tar_out` stream of their parent
directory (the UTF-8 siblings excluded) and hashed on the host.

Backend: `direct`. TCG unless LIBGUESTFS_BACKEND_SETTINGS is set in the environment (this host's /dev/kvm
does not work; where KVM works, set LIBGUESTFS_BACKEND_SETTINGS= to let libguestfs use it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hostguard.errors import HostguardError, ImageError
from hostguard.imagefs import (
    DEFAULT_LIMITS,
    HEAD_BYTES,
    FilesystemInfo,
    FsNode,
    GuestFilesystemReader,
    ImageSpec,
    Limits,
    NodeKind,
)
from hostguard.imagefs.disk import check_image
from hostguard.imagefs.partitions import BIOS_BOOT_GPT_TYPE, LINUX_DATA_GPT_TYPES, MBR_LINUX, describe
from hostguard.record import replace

STAT_BATCH = 1000
READ_CHUNK = 1 << 20
XATTR_BATCH = 200
SKIP_TYPES = ("swap", "unknown", "")
TOP_LEVEL = 5  # the Btrfs top-level subvolume (BTRFS_FS_TREE_OBJECTID)
# blkid types of containers: what is inside is only readable once the container was opened (LVM, md) or not at
# all (encryption, ZFS); never a filesystem of their own.
CONTAINER_TYPES = frozenset(
    {"LVM2_member", "crypto_LUKS", "linux_raid_member", "zfs_member", "BitLocker", "VMFS_volume_member"}
)
_SD = re.compile(r"/dev/sd([a-z]+)(\d*)")
_TAR_SPECIAL = re.compile(r"([\\*?\[])")
_LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")  # lvm(8) VALID NAMES (no spaces)
_LV_PATH = re.compile(r"/dev/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")
_PV_UUID = re.compile(r"[A-Za-z0-9]{32}")


class GuestfsReader(GuestFilesystemReader):
    name = "guestfs"
    remote_digest = True

    def __init__(self, specs: Sequence[ImageSpec], *, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._fds: list[int] = []
        self._g: Any = None
        self._mounted: str | None = None
        self._btrfs_nested: dict[str, list[bytes]] = {}  # locator -> nested subvolume paths inside it
        self._tmp = Path(tempfile.mkdtemp(prefix="hostguard-guestfs-"))
        self._label = ", ".join(str(s.path) for s in specs)
        try:
            self._launch(specs)
            self._fs = self._discover()
        except BaseException:
            self.close()
            raise

    # --- set-up ----------------------------------------------------------------------------------------

    def _launch(self, specs: Sequence[ImageSpec]) -> None:
        try:
            import guestfs
        except ImportError:
            raise ImageError("the guestfs reader needs python3-guestfs (libguestfs)") from None

        paths = []
        for spec in specs:
            self._fds.append(check_image(spec))  # validated; QEMU opens this very file
            paths.append(f"/proc/{os.getpid()}/fd/{self._fds[-1]}")
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=True)
        self._g = g
        self._call("set_backend", os.environ.get("LIBGUESTFS_BACKEND") or "direct")
        if "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ:
            self._call("set_backend_settings", ["force_tcg"])
        self._call("set_network", False)
        for path, spec in zip(paths, specs, strict=True):
            self._call("add_drive_opts", path, format=spec.format, readonly=True)
        self._call("launch")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._g, method)(*args, **kwargs)
        except RuntimeError as err:
            what = " ".join(str(a)[:200] for a in args if isinstance(a, str))
            raise ImageError(f"{self._label}: libguestfs {method} {what}: {' '.join(str(err).split())}") from None

    def _discover(self) -> dict[str, tuple[FilesystemInfo, str]]:
        devices = self._call("list_devices")
        index = {dev: i for i, dev in enumerate(devices)}
        found: dict[str, tuple[FilesystemInfo, str]] = {}
        for dev, fstype in sorted(self._call("list_filesystems").items()):
            if fstype in SKIP_TYPES or fstype in CONTAINER_TYPES or dev.startswith("btrfsvol:"):
                continue  # containers: _check_containers
            info = self._info(dev, fstype, index)
            if fstype == "btrfs":
                for sub, mount in self._btrfs_subvolumes(info, dev):
                    found[sub.locator] = (sub, mount)
                continue
            found[info.locator] = (info, dev)
        self._check_containers()
        self._check_partitions(found)
        if not found:
            raise ImageError(f"{self._label}: no filesystem found (corrupt or empty image?)")
        return dict(sorted(found.items(), key=lambda kv: _order(kv[1][0])))

    def _info(self, dev: str, fstype: str, index: dict[str, int]) -> FilesystemInfo:
        image_index = partition = partuuid = partlabel = None
        m = _SD.fullmatch(dev)
        if m and dev in index:
            image_index = index[dev]
            locator = f"disk{image_index}"
        elif m:
            disk = self._call("part_to_dev", dev)
            image_index = index[disk]
            partition = int(self._call("part_to_partnum", dev))
            locator = f"disk{image_index}p{partition}"
            if self._call("part_get_parttype", disk) == "gpt":
                partuuid = str(self._call("part_get_gpt_guid", disk, partition)).lower()
                partlabel = str(self._call("part_get_name", disk, partition))
        elif dev.startswith("/dev/md"):
            locator = "md:" + dev[len("/dev/") :]
        elif dev.count("/") == 3 and dev in set(self._call("lvs")):
            _, _, vg, lv = dev.split("/")
            locator = f"lvm:{vg}:{lv}"
        else:
            locator = "dev:" + dev[len("/dev/") :].replace("/", ":")
        uuid = str(self._call("vfs_uuid", dev)).lower() or None
        try:
            label = str(self._g.vfs_label(dev)).encode() or None
        except (RuntimeError, UnicodeError):
            label = None
        return FilesystemInfo(
            locator=locator,
            fstype=fstype,
            image_index=image_index,
            partition=partition,
            uuid=uuid,
            label=label,
            partuuid=partuuid,
            partlabel=partlabel,
            device=f"{self._label} ({dev})",
        )

    def _btrfs_subvolumes(self, info: FilesystemInfo, dev: str) -> list[tuple[FilesystemInfo, str]]:
        """Each Btrfs subvolume as a filesystem of its own, as the fast reader has them (ADR 0022): the top
        level keeps the volume's locator, the others are `LOCATOR:subvolid=N`. The mount spec is the device
        and the subvolume id, NUL-separated (`_mount_dev`)."""
        self._mount_dev(f"{dev}\0{TOP_LEVEL}")
        listed = self._call("btrfs_subvolume_list", "/")
        default = int(self._call("btrfs_subvolume_get_default", "/"))
        named = ((int(s["btrfssubvolume_id"]), str(s["btrfssubvolume_path"])) for s in listed)
        subvols = [(TOP_LEVEL, ""), *sorted((sid, path.removeprefix("<FS_TREE>/").strip("/")) for sid, path in named)]
        out = []
        for sid, path in subvols:
            locator = info.locator if sid == TOP_LEVEL else f"{info.locator}:subvolid={sid}"
            sub = replace(
                info,
                locator=locator,
                subvolume=path,
                subvolid=sid,
                default_subvolume=sid == default,
                device=info.device if sid == TOP_LEVEL else f"{info.device} (Btrfs subvolume {path})",
            )
            inner = [p for _i, p in subvols if p and (not path or p.startswith(path + "/"))]
            self._btrfs_nested[locator] = [(p[len(path) :].lstrip("/")).encode() for p in inner]
            out.append((sub, f"{dev}\0{sid}"))
        return out

    def _check_containers(self) -> None:
        """Every container on the disks must have yielded its filesystems, or the inventory would silently
        miss the files inside: an LVM physical volume whose volume group did not come up (corrupt metadata,
        a missing disk), an encrypted volume, a ZFS pool member, a RAID member that was not assembled."""
        # Physical volumes are matched to volume groups by PV UUID, never by device name: the appliance's
        # kernel may name our disk /dev/sdb (its own disk took sda: SCSI disks are probed in parallel, and on a
        # loaded host the order flips). libguestfs translates device names in arguments and RDevice results,
        # but not inside structs (`pvs_full`'s pv_name stays /dev/sdb2), so a name lookup missed a good PV.
        # When metadata is unreadable, LVM prints "Retrying metadata scan." on stdout, which vgs/lvs/pvuuid
        # return as if it were a name: anything that is not a valid LVM name or UUID is not one.
        in_groups: set[str] = set()
        for vg in self._call("vgs"):
            if _LVM_NAME.fullmatch(vg):
                in_groups.update(_pv_uuid(u) for u in self._call("vgpvuuids", vg))
        in_groups.discard("")
        assembled: set[str] = set()
        for md in self._call("list_md_devices"):
            assembled.update(str(m["mdstat_device"]) for m in self._call("md_stat", md))
        for dev in [*self._call("list_devices"), *self._call("list_partitions")]:
            self._check_container(dev, in_groups, assembled)
        for lv in self._call("lvs"):  # after the disks: a PV of a corrupt group is named before its junk "LVs"
            if _LV_PATH.fullmatch(lv):
                self._check_container(lv, in_groups, assembled)

    def _check_container(self, dev: str, in_groups: set[str], assembled: set[str]) -> None:
        kind = self._call("vfs_type", dev)
        if kind == "LVM2_member":
            if _pv_uuid(self._call("pvuuid", dev)) not in in_groups:
                raise ImageError(
                    f"{self._label}: {dev}: {describe(kind)} whose volume group could not be read (corrupt "
                    "LVM metadata or a missing disk?): its logical volumes cannot be inventoried"
                )
        elif kind == "linux_raid_member":
            if dev.rpartition("/")[2] not in assembled and dev not in assembled:
                raise ImageError(f"{self._label}: {dev}: {describe(kind)} that was not assembled")
        elif kind in CONTAINER_TYPES:
            raise ImageError(f"{self._label}: {dev}: {describe(kind)}: hostguard cannot read the files inside")

    def _check_partitions(self, found: dict[str, tuple[FilesystemInfo, str]]) -> None:
        """A Linux filesystem partition without a recognisable filesystem is corruption, as for the fast
        reader: never silently skip what may hold files."""
        devices = {dev for _info, dev in found.values()}
        for part in self._call("list_partitions"):
            if part in devices or self._call("vfs_type", part):
                continue
            disk = self._call("part_to_dev", part)
            num = int(self._call("part_to_partnum", part))
            parttype = self._call("part_get_parttype", disk)
            if parttype == "gpt":
                gtype = str(self._call("part_get_gpt_type", disk, num)).lower()
                linux = gtype in LINUX_DATA_GPT_TYPES and gtype != BIOS_BOOT_GPT_TYPE
            else:
                linux = parttype == "msdos" and int(self._call("part_get_mbr_id", disk, num)) == MBR_LINUX
            if linux:
                raise ImageError(f"{self._label}: {part}: Linux filesystem partition holds no filesystem (corrupt?)")

    # --- interface -------------------------------------------------------------------------------------

    def filesystems(self) -> tuple[FilesystemInfo, ...]:
        return tuple(info for info, _dev in self._fs.values())

    def _mount(self, fs: FilesystemInfo) -> None:
        self._mount_dev(self._fs[fs.locator][1])

    def _mount_dev(self, dev: str) -> None:
        if self._mounted == dev:
            return
        self._call("umount_all")
        self._mounted = None
        device, _, subvolid = dev.partition("\0")
        if subvolid:
            self._call("mount_options", f"ro,subvolid={subvolid}", device, "/")
        else:
            self._call("mount_ro", dev, "/")
        self._mounted = dev

    def read_file(self, fs: FilesystemInfo, path: bytes, limit: int) -> bytes | None:
        self._mount(fs)
        p = path.decode()
        if not self._call("is_file", p, followsymlinks=True):
            return None
        size = int(self._call("statns", p)["st_size"])
        if size > limit:
            raise ImageError(f"{fs.device}: {p}: {size} bytes exceed the limit of {limit}")
        data: bytes = self._call("read_file", p)
        return data

    def _located(self, node: FsNode) -> str:
        """Mount the node's filesystem (the walk may have moved on to another) and return its path."""
        if not (isinstance(node.handle, tuple) and len(node.handle) == 2):
            raise ImageError(f"guestfs reader: {node.path!r} has no appliance path (name is not UTF-8)")
        dev, path = node.handle
        self._mount_dev(str(dev))
        return str(path)

    def digest(self, node: FsNode) -> str:
        return str(self._call("checksum", "sha256", self._located(node)))

    def read_chunks(self, node: FsNode) -> Iterator[bytes | memoryview]:
        """Content through `pread` round trips (slow: meant for a few pages, not for hashing)."""
        path = self._located(node)
        offset = 0
        while offset < node.size:
            data = bytes(self._call("pread", path, min(READ_CHUNK, node.size - offset), offset))
            if not data:
                raise ImageError(f"{self._label}: {path}: file ends at {offset} of {node.size} bytes")
            yield data
            offset += len(data)

    def walk(self, fs: FilesystemInfo) -> Iterator[FsNode]:
        self._mount(fs)
        listing = self._tmp / "find0"
        self._call("find0", "/", str(listing))
        dirs: dict[bytes, list[bytes]] = {b"": []}
        nested = self._btrfs_nested.get(fs.locator, [])
        for count, rel in enumerate(_split0(listing), start=1):
            if nested and any(rel == n or rel.startswith(n + b"/") for n in nested):
                continue  # a nested Btrfs subvolume: a filesystem of its own
            if count > self.limits.max_nodes:
                raise ImageError(f"{fs.device}: more than {self.limits.max_nodes} directory entries")
            if len(rel) + 1 > self.limits.max_path_bytes:
                raise ImageError(f"{fs.device}: path longer than {self.limits.max_path_bytes} bytes")
            parent, _, name = rel.rpartition(b"/")
            dirs.setdefault(parent, []).append(name)
        listing.unlink()
        for parent, names in dirs.items():
            if not _utf8(parent):
                continue  # inside a subtree that a tar stream of an ancestor covers
            good = [n for n in names if _utf8(n)]
            yield from self._stat_dir(fs, parent, good)
            if len(good) != len(names):
                yield from self._tar_dir(fs, parent, good)

    def _stat_dir(self, fs: FilesystemInfo, parent: bytes, names: list[bytes]) -> Iterator[FsNode]:
        pdir = "/" + parent.decode()
        dev = self._fs[fs.locator][1]
        for start in range(0, len(names), STAT_BATCH):
            self._mount_dev(dev)  # a caller may have read another filesystem's file since the last batch
            batch = [n.decode() for n in names[start : start + STAT_BATCH]]
            stats = self._call("lstatnslist", pdir, batch)
            if len(stats) != len(batch):
                raise ImageError(f"{fs.device}: {pdir}: lstatnslist returned {len(stats)} of {len(batch)} entries")
            regular = [n for n, st in zip(batch, stats, strict=True) if stat.S_ISREG(st["st_mode"])]
            caps = self._capabilities(pdir, regular)
            for name, st in zip(batch, stats, strict=True):
                path = _join(pdir, name)
                if st["st_ino"] == -1:
                    raise ImageError(f"{fs.device}: {path}: cannot stat")
                mode = int(st["st_mode"])
                kind = _kind(mode)
                head = b""
                if kind is NodeKind.FILE and not mode & 0o111 and st["st_size"] > 0:
                    head = bytes(self._call("pread", path, HEAD_BYTES, 0))
                yield FsNode(
                    path=path.encode(),
                    kind=kind,
                    mode=mode & 0o7777,
                    uid=int(st["st_uid"]),
                    gid=int(st["st_gid"]),
                    size=int(st["st_size"]),
                    inode=int(st["st_ino"]),
                    nlink=int(st["st_nlink"]),
                    capability=caps.get(name),
                    head=head,
                    handle=(dev, path),
                )

    def _capabilities(self, pdir: str, names: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for start in range(0, len(names), XATTR_BATCH):
            batch = names[start : start + XATTR_BATCH]
            entries = self._call("lxattrlist", pdir, batch)
            pos = 0
            for name in batch:
                if pos >= len(entries) or entries[pos]["attrname"] != "":
                    raise ImageError(f"{self._label}: {pdir}: malformed lxattrlist reply")
                count = int(bytes(entries[pos]["attrval"]).rstrip(b"\0") or b"0")
                for entry in entries[pos + 1 : pos + 1 + count]:
                    if entry["attrname"] == "security.capability":
                        value = bytes(entry["attrval"])
                        if len(value) > self.limits.max_xattr_bytes:
                            raise ImageError(f"{self._label}: {_join(pdir, name)}: xattr too large")
                        out[name] = value
                pos += 1 + count
        return out

    def _tar_dir(self, fs: FilesystemInfo, parent: bytes, utf8_names: list[bytes]) -> Iterator[FsNode]:
        """Entries of `parent` whose names are not UTF-8 (with their subtrees), from a tar stream."""
        self._mount(fs)
        pdir = "/" + parent.decode()
        fifo = self._tmp / "tar.fifo"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        excludes = ["./" + _TAR_SPECIAL.sub(r"\\\1", n.decode()) for n in utf8_names]
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                self._call("tar_out", pdir, str(fifo), numericowner=True, xattrs=True, excludes=excludes)
            except HostguardError as err:
                failure.append(err)

        thread = threading.Thread(target=produce, name="hg-guestfs-tar", daemon=True)
        thread.start()
        # Read the whole stream before yielding anything: the handle is busy with tar_out until it ends,
        # and a caller's own libguestfs call in between would wait for it forever.
        try:
            with fifo.open("rb") as stream:
                nodes = list(self._read_tar(fs, parent, stream))
                while stream.read(1 << 20):  # drain whatever follows the end-of-archive marker
                    pass
        finally:
            thread.join()
            fifo.unlink(missing_ok=True)
        if failure:
            raise failure[0]
        yield from nodes

    def _read_tar(self, fs: FilesystemInfo, parent: bytes, stream: Any) -> Iterator[FsNode]:
        base = b"/" + parent if parent else b""
        try:
            with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as archive:
                yield from self._tar_members(fs, base, archive)
        except tarfile.TarError as err:
            raise ImageError(f"{fs.device}: {'/' + parent.decode()}: unreadable tar stream: {err}") from None

    def _tar_members(self, fs: FilesystemInfo, base: bytes, archive: tarfile.TarFile) -> Iterator[FsNode]:
        seen: dict[str, tuple[str, int, bytes]] = {}
        for member in archive:
            rel = member.name.encode("utf-8", "surrogateescape")
            if rel in (b".", b"./"):
                continue
            rel = rel.removeprefix(b"./").rstrip(b"/")
            path = base + b"/" + rel
            if len(path) > self.limits.max_path_bytes:
                raise ImageError(f"{fs.device}: path longer than {self.limits.max_path_bytes} bytes")
            raw_cap = member.pax_headers.get("SCHILY.xattr.security.capability")
            cap = raw_cap.encode("utf-8", "surrogateescape") if raw_cap is not None else None
            digest = None
            head = b""
            size = member.size
            if member.isreg():
                digest, head = _hash_member(archive, member)
                seen[member.name] = (digest, size, head)
                kind = NodeKind.FILE
            elif member.islnk():
                if member.linkname not in seen:
                    raise ImageError(f"{fs.device}: tar stream: hard link to unknown {member.linkname[:200]!r}")
                digest, size, head = seen[member.linkname]
                kind = NodeKind.FILE
            elif member.isdir():
                kind = NodeKind.DIR
            elif member.issym():
                kind = NodeKind.SYMLINK
            else:
                kind = NodeKind.OTHER
            yield FsNode(
                path=path,
                kind=kind,
                mode=member.mode & 0o7777,
                uid=member.uid,
                gid=member.gid,
                size=size,
                capability=cap if kind is NodeKind.FILE else None,
                head=b"" if member.mode & 0o111 else head,
                digest=digest,
            )

    def close(self) -> None:
        if self._g is not None:
            with contextlib.suppress(RuntimeError):  # the appliance is going away anyway; close() reaps it
                self._g.shutdown()
            self._g.close()
            self._g = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        shutil.rmtree(self._tmp, ignore_errors=True)


def _hash_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str, bytes]:
    h = hashlib.sha256()
    head = b""
    fileobj = archive.extractfile(member)
    if fileobj is None:
        raise ImageError(f"tar stream: no content for {member.name[:200]!r}")
    while chunk := fileobj.read(1 << 20):
        if len(head) < HEAD_BYTES:
            head = (head + chunk)[:HEAD_BYTES]
        h.update(chunk)
    return h.hexdigest(), head


def _split0(path: Path) -> Iterator[bytes]:
    rest = b""
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            parts = (rest + chunk).split(b"\0")
            rest = parts.pop()
            yield from (p for p in parts if p)
    if rest:
        yield rest


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _join(pdir: str, name: str) -> str:
    return pdir.rstrip("/") + "/" + name


def _kind(mode: int) -> NodeKind:
    if stat.S_ISREG(mode):
        return NodeKind.FILE
    if stat.S_ISDIR(mode):
        return NodeKind.DIR
    if stat.S_ISLNK(mode):
        return NodeKind.SYMLINK
    return NodeKind.OTHER


def _order(info: FilesystemInfo) -> tuple[int, int, str]:
    return (
        info.image_index if info.image_index is not None else 1 << 30,
        info.partition or 0,
        info.locator,
    )


def _pv_uuid(text: str) -> str:
    """A PV UUID without its dashes, or "" for anything else (LVM's messages on stdout)."""
    uuid = str(text).strip().replace("-", "")
    return uuid if _PV_UUID.fullmatch(uuid) else ""
