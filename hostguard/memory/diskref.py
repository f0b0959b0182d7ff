"""The disk side of the memory comparison, read from the domain's (verified) disk images on the host:
for each manifest file, its filesystem UUID and inode number (`DiskReference`), and the digest of the first
page of each manifest ELF file (what the ELF scan compares memory pages with).

One walk of each filesystem, reading at most one page per manifest file, through the same readers as the disk
inventory (`hostguard.imagefs`). The caller must have verified the images (digests) first; this module only
reads them. A file whose first page cannot be read is left out, so its pages in memory will be reported.
"""

from __future__ import annotations

from collections.abc import Collection

from hostguard.errors import ImageError
from hostguard.imagefs import GuestFilesystemReader, NodeKind
from hostguard.imagefs.layout import FSTAB, plan
from hostguard.memory.elfscan import PAGE, head_page_sha256
from hostguard.memory.judge import DiskFile, DiskReference
from hostguard.record import Record
from hostguard.signed.manifest import Manifest, encode_path


class DiskFacts(Record):
    reference: DiskReference
    heads: frozenset[str]  # first-page digests of the manifest's ELF files
    unreadable: tuple[str, ...] = ()  # manifest ELF files whose first page could not be read


def _first_page(reader: GuestFilesystemReader, node: object) -> bytes:
    out = bytearray()
    chunks = reader.read_chunks(node)  # type: ignore[arg-type]
    try:
        for chunk in chunks:
            out += chunk
            if len(out) >= PAGE:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return bytes(out[:PAGE])


def disk_facts(reader: GuestFilesystemReader, manifest: Manifest, *, paths: Collection[str] | None = None) -> DiskFacts:
    """Walk every filesystem `reader` found, placed as the guest's /etc/fstab says (like the inventory)."""
    wanted = set(paths) if paths is not None else {f.path for f in manifest.files}
    filesystems = reader.filesystems()
    fstabs = {}
    for fs in filesystems:
        text = reader.read_file(fs, FSTAB, reader.limits.max_small_file)
        if text is not None:
            fstabs[fs.locator] = text
    layout = plan(filesystems, fstabs)
    files: dict[str, DiskFile] = {}
    heads: set[str] = set()
    unreadable: list[str] = []
    for fs in filesystems:
        for node in reader.walk(fs):
            if node.kind is not NodeKind.FILE:
                continue
            path = encode_path(layout.guest_path(fs.locator, node.path))
            if path not in wanted:
                continue
            if node.inode is not None:
                files[path] = DiskFile(node.inode, fs.uuid)
            if node.size < 4 or (node.head and not node.head.startswith(b"\x7fELF")):
                continue  # readers fill `head` only when they need it for the classification
            try:
                page = _first_page(reader, node)
            except ImageError:
                unreadable.append(path)
                continue
            if page.startswith(b"\x7fELF"):
                heads.add(head_page_sha256(page))
    return DiskFacts(DiskReference(files), frozenset(heads), tuple(sorted(unreadable)))
