"""Signed images on an OCI registry: push (producer), pull and sync (host). Layout: docs/formats.md, ADR 0015.

The disk image travels as an OCI image in KubeVirt's containerDisk shape: an image manifest whose one
uncompressed tar layer holds the disk under `disk/` (owned 107:107, as KubeVirt documents), and for direct
kernel boot `boot/vmlinuz` and `boot/initrd` (KubeVirt's kernel-boot container layout). The DSSE envelope is
a referrer of that manifest (OCI 1.1 `subject`, artifactType ARTIFACT_TYPE), found through the referrers API
or the referrers tag schema.

A pull never trusts the registry: the manifest must hash to the digest the tag resolved to (once), the
envelope is verified against the host's trust store before any image byte is fetched, the layer is checked
and unpacked as it streams (the disk is written once, in the library directory under a hidden name), and
only when the layer (byte for byte the layout `push` writes for the signed files, or else its digest:
`ocilayer`, ADR 0034), the tar layout and the signed digests (`Library.add_fetched`, the same verification as
`library add`) all hold does the image take its library name. An interrupted download resumes: what was
fetched is re-checked from disk, then the rest is asked for with a Range request. Partial
downloads live beside the library directory (`pulling_dir`), never in the libvirt pool itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hostguard.errors import (
    DigestMismatchError,
    FormatError,
    HostguardError,
    RollbackError,
    UsageError,
    VerificationError,
)
from hostguard.host.digest import Digested, FileIdentity
from hostguard.host.oci import (
    DIGEST_RE,
    MANIFEST_V1,
    Reference,
    RegistryClient,
    RegistryError,
    canonical_json,
    descriptor,
    parse_json,
    sha256_digest,
)
from hostguard.host.verify_files import MAX_ENVELOPE_FILE, read_envelope
from hostguard.library.ocilayer import (
    CHUNK,
    QUEUE_MAX,
    LayerCheck,
    LayerWriter,
    Layout,
    layer_layout,
    layout_size,
)
from hostguard.library.ociunpack import Unpacker
from hostguard.library.pool import Library
from hostguard.signed.envelope import parse_envelope
from hostguard.signed.manifest import parse_manifest

ARTIFACT_TYPE = "application/vnd.hostguard.manifest.v1+json"
ENVELOPE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
ANNOTATION_NAME = "dev.hostguard.image.name"
ANNOTATION_VERSION = "dev.hostguard.image.version"
RING = 2 * (QUEUE_MAX + 2) + 4  # download buffers: see _stream
MAX_REFERRERS = 16
TAR_OVERHEAD = 64 * 1024  # headers, PAX records, padding and end blocks of at most five members


def _disk_member(manifest: Any) -> str:
    """The tar member `push` gives the disk of this signed manifest."""
    return f"disk/{manifest.image.name}.{'qcow2' if manifest.disks[0].format == 'qcow2' else 'img'}"


def _signed_layout(manifest: Any, layer_size: int) -> Layout | None:
    """The layer `push` writes for the files this manifest signs (the disk, with or without the boot files), if
    the registry's layer has its size; None otherwise (the layer is then checked against its digest)."""
    disk = (_disk_member(manifest), int(manifest.disks[0].size))
    candidates = [[disk]]
    boot = manifest.boot
    if boot is not None and boot.kernel is not None and boot.initrd is not None:
        candidates.append([("boot/vmlinuz", boot.kernel.size), ("boot/initrd", boot.initrd.size), disk])
    for files in candidates:
        layout = layer_layout(files)
        if layout_size(layout) == layer_size:
            return layout
    return None


# --- the layer: written while it is uploaded ------------------------------------------------------------------


def push(
    image: Path,
    envelope_path: Path,
    target: Reference,
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    insecure: bool = False,
) -> dict[str, Any]:

    if (kernel is None) != (initrd is None):
        raise UsageError("give --kernel and --initrd together")
    envelope = read_envelope(envelope_path)
    manifest = parse_manifest(parse_envelope(envelope).payload)  # the producer's own file: checked against it
    if len(manifest.disks) != 1:
        raise UsageError("library images hold one disk image each")
    disk = manifest.disks[0]
    disk_name = _disk_member(manifest)
    files = [(disk_name, image)]
    wanted = {disk_name: (disk.sha256, disk.size)}
    if kernel is not None and initrd is not None:
        if manifest.boot is None or manifest.boot.kernel is None or manifest.boot.initrd is None:
            raise UsageError("the manifest signs no kernel and initrd: push without --kernel/--initrd")
        files = [("boot/vmlinuz", kernel), ("boot/initrd", initrd), *files]  # small files first: see Unpacker
        wanted["boot/vmlinuz"] = (manifest.boot.kernel.sha256, manifest.boot.kernel.size)
        wanted["boot/initrd"] = (manifest.boot.initrd.sha256, manifest.boot.initrd.size)
    for name, path in files:
        if path.stat().st_size != wanted[name][1]:
            raise DigestMismatchError(f"{path} is not the file the envelope signs (size)")

    client = RegistryClient(target, insecure=insecure)
    writer = LayerWriter(files)
    layer_digest = client.upload_stream(writer.chunks(), writer.digest)
    for name, path in files:
        if writer.file_digests.get(name) != wanted[name]:
            raise DigestMismatchError(f"{path} is not the file the envelope signs (sha256): nothing was tagged")
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},  # uncompressed: diff_id == digest
        }
    )
    config_digest = client.upload_bytes(config)
    annotations = {
        ANNOTATION_NAME: manifest.image.name,
        ANNOTATION_VERSION: str(manifest.image.version),
        "org.opencontainers.image.title": manifest.image.name,
        "org.opencontainers.image.version": str(manifest.image.version),
    }
    image_manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V1,
            "config": descriptor(CONFIG_MEDIA_TYPE, config_digest, len(config)),
            "layers": [descriptor(LAYER_MEDIA_TYPE, layer_digest, writer.size)],
            "annotations": annotations,
        }
    )
    image_digest, _ = client.put_manifest(target.ref, image_manifest, MANIFEST_V1)

    empty_digest = client.upload_bytes(EMPTY_JSON)
    envelope_digest = client.upload_bytes(envelope)
    referrer = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V1,
            "artifactType": ARTIFACT_TYPE,
            "config": descriptor(EMPTY_MEDIA_TYPE, empty_digest, len(EMPTY_JSON)),
            "layers": [descriptor(ENVELOPE_MEDIA_TYPE, envelope_digest, len(envelope))],
            "subject": descriptor(MANIFEST_V1, image_digest, len(image_manifest)),
            "annotations": annotations,
        }
    )
    referrer_digest, headers = client.put_manifest(sha256_digest(referrer), referrer, MANIFEST_V1)
    how = "api"
    if headers.get("OCI-Subject") != image_digest:  # the registry did not index the subject: the tag schema
        client.add_referrer_to_fallback_tag(
            image_digest,
            descriptor(
                MANIFEST_V1, referrer_digest, len(referrer), artifactType=ARTIFACT_TYPE, annotations=annotations
            ),
        )
        how = "tag"
    return {
        "reference": str(target),
        "digest": image_digest,
        "layer": layer_digest,
        "layer_size": writer.size,
        "signature": referrer_digest,
        "referrers": how,
        "image": manifest.image.name,
        "version": manifest.image.version,
    }


# --- pull ----------------------------------------------------------------------------------------------------


class Progress:
    """One self-overwriting line on a terminal (nothing otherwise): bytes, percent, MiB/s."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled and sys.stderr.isatty()
        self.done, self.start, self.shown = 0, time.monotonic(), 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.shown > 0.25 or self.done >= self.total):
            self.shown = now
            rate = self.done / max(now - self.start, 1e-6) / 2**20
            pct = 100 * self.done / max(self.total, 1)
            sys.stderr.write(f"\r{self.label}: {self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB {pct:5.1f}% "
                             f"{rate:,.0f} MiB/s")  # fmt: skip
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _image_manifest(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = parse_json(body, "image manifest")
    layers = doc.get("layers")
    if doc.get("mediaType") != MANIFEST_V1 or not isinstance(layers, list) or len(layers) != 1:
        raise FormatError("not a hostguard image: an OCI image manifest with one tar layer is expected")
    layer = layers[0]
    if (
        not isinstance(layer, dict)
        or layer.get("mediaType") != LAYER_MEDIA_TYPE
        or not isinstance(layer.get("digest"), str)
        or not DIGEST_RE.fullmatch(layer["digest"])
        or not isinstance(layer.get("size"), int)
        or layer["size"] < 0
    ):
        raise FormatError(f"the image's layer must be an uncompressed tar ({LAYER_MEDIA_TYPE}) with a sha256 digest")
    return doc, layer


def _envelopes(client: RegistryClient, digest: str) -> tuple[list[bytes], str]:
    """The envelopes referring to the image manifest `digest`, each checked against its descriptor."""
    entries, how = client.referrers(digest, ARTIFACT_TYPE)
    out = []
    for entry in entries[:MAX_REFERRERS]:
        body, _, _ = client.get_manifest(entry["digest"], (MANIFEST_V1,))
        doc = parse_json(body, "signature manifest")
        subject, layers = doc.get("subject"), doc.get("layers")
        if (
            doc.get("artifactType") != ARTIFACT_TYPE
            or not isinstance(subject, dict)
            or subject.get("digest") != digest
            or not isinstance(layers, list)
            or len(layers) != 1
            or not isinstance(layers[0], dict)
            or layers[0].get("mediaType") != ENVELOPE_MEDIA_TYPE
            or not isinstance(layers[0].get("digest"), str)
            or not DIGEST_RE.fullmatch(layers[0]["digest"])
        ):
            continue  # not ours, or not about this image: a registry may list anything
        out.append(client.get_blob(layers[0]["digest"], MAX_ENVELOPE_FILE))
    return out, how


def _verified_envelope(lib: Library, envelopes: list[bytes], where: str) -> tuple[bytes, Any]:
    if not envelopes:
        raise VerificationError(f"{where} has no hostguard signature (no referrer of type {ARTIFACT_TYPE})")
    first: VerificationError | None = None
    for envelope in envelopes:
        try:
            return envelope, lib.precheck(envelope)
        except VerificationError as exc:
            first = first or exc
    assert first is not None
    raise first


def pull(
    lib: Library,
    source: Reference,
    *,
    name: str | None = None,
    insecure: bool = False,
    progress: bool = True,
    client: RegistryClient | None = None,
) -> dict[str, Any]:
    started = time.monotonic()
    client = client or RegistryClient(source, insecure=insecure)
    body, _, digest = client.get_manifest(source.ref, (MANIFEST_V1,))  # a tag is resolved here, once
    _, layer = _image_manifest(body)
    envelopes, how = _envelopes(client, digest)
    envelope, outcome = _verified_envelope(lib, envelopes, f"{source.registry}/{source.repository}@{digest}")
    name = lib.default_name(outcome, name)  # before any download: a name in use fails now

    layer_digest, layer_size = str(layer["digest"]), int(layer["size"])
    signed = outcome.manifest
    boot = (signed.boot.kernel, signed.boot.initrd) if signed.boot else ()
    files_size = sum(b.size for b in (signed.disks[0], *boot) if b is not None)
    if layer_size > files_size + TAR_OVERHEAD:
        raise FormatError(f"layer {layer_digest} is larger than the signed files it can hold: not downloaded")
    lib.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    work = pulling_dir(lib) / layer_digest.removeprefix("sha256:")
    try:
        layout = _signed_layout(signed, layer_size)
        result = _download_layer(client, work, layer_digest, layer_size, layout=layout, progress=progress)
    except BaseException:
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # empty unless a partial download is kept for the next run
        raise
    try:
        files = dict(result["files"])
        disk_path = files["image"]
        st = os.stat(disk_path)
        disk = Digested(disk_path, result["disk_sha256"], st.st_size, FileIdentity.from_stat(st), cached=False)
        origin = {"registry": source.registry, "repository": source.repository, "tag": source.tag, "digest": digest}
        entry = lib.add_fetched(envelope, name, files, disk, origin)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # only when no other pull is under way
    return {
        **entry,
        "digest": digest,
        "layer": layer_digest,
        "layer_size": layer_size,
        "layer_checked_by": result["checked_by"],
        "resumed_from": result["resumed_from"],
        "referrers": how,
        "seconds": round(time.monotonic() - started, 3),
    }


def pulling_dir(lib: Library) -> Path:
    """Where partial pulls live: beside the library directory, not in it. The library directory is a libvirt
    `dir` pool, which lists every entry as a volume (a `.pulling/` directory too) and whose refresh must never
    meet a half-fetched image. Beside it is on the same filesystem, so a verified image is renamed into place,
    not copied; a library directory that is a mount point of its own keeps them inside (its only such place)."""
    beside = lib.dir.parent / f".{lib.dir.name}.pulling"
    if os.stat(lib.dir.parent).st_dev == os.stat(lib.dir).st_dev:
        return beside
    return lib.dir / ".pulling"


def _download_layer(
    client: RegistryClient, work: Path, digest: str, size: int, *, layout: Layout | None, progress: bool
) -> dict[str, Any]:
    """Fetch and unpack the layer into `work`, resuming from a previous run's files there."""
    work.parent.mkdir(mode=0o700, exist_ok=True)
    bar = Progress(size, f"pull {digest[:19]}", progress)
    check, unpacker, offset = _resume(work, layout, bar)
    resumed_from = offset
    try:
        if offset < size:
            response, start = client.open_blob(digest, offset)
            if start != offset:  # the registry ignored Range: start again from scratch
                response.close()
                check.close()
                unpacker.close()
                shutil.rmtree(work, ignore_errors=True)
                return _download_layer(client, work, digest, size, layout=layout, progress=progress)
            with response:
                offset = _stream(response, offset, size=size, check=check, unpacker=unpacker, bar=bar, digest=digest)
        unpacker.close()
        checked_by = check.verify(digest)
        unpacker.finish()
    except (RegistryError, KeyboardInterrupt):
        check.close()
        unpacker.close()  # an interruption: keep what was fetched for the next run, which re-checks it
        raise
    except BaseException:
        check.close()
        unpacker.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {
        "files": unpacker.files,
        "disk_sha256": unpacker.disk_hash.hexdigest(),
        "resumed_from": resumed_from,
        "checked_by": checked_by,
    }


def _checked_unpacker(work: Path, layout: Layout | None, *, prefix_out: bool = True) -> tuple[LayerCheck, Unpacker]:
    unpacker = Unpacker(work, prefix_out=prefix_out)
    return LayerCheck(layout, lambda: list(unpacker.files.values())), unpacker


def _resume(work: Path, layout: Layout | None, bar: Progress) -> tuple[LayerCheck, Unpacker, int]:
    """A check and an unpacker positioned after what a previous run fetched (re-checked now), or fresh ones at
    0. The layer's bytes go to the check before the unpacker writes them (its catch-up reads written files)."""
    prefix_path, disk_path = work / "prefix", work / "image"
    if prefix_path.is_file() and disk_path.is_file():
        have = disk_path.stat().st_size
        keep = work / "image.partial"
        os.replace(disk_path, keep)  # replaying the prefix re-creates the disk file
        prefix = prefix_path.read_bytes()
        check, unpacker = _checked_unpacker(work, layout, prefix_out=False)
        try:
            check.update(prefix)
            unpacker.feed(memoryview(prefix))
            if unpacker.state == "data" and unpacker.role == "image" and have <= unpacker.remaining:
                assert unpacker.out is not None
                os.close(unpacker.out)
                os.replace(keep, disk_path)
                unpacker.out = os.open(disk_path, os.O_WRONLY | os.O_CLOEXEC)
                unpacker.replay_disk(disk_path, have, check.update)
                bar(len(prefix) + have)
                return check, unpacker, len(prefix) + have
        except HostguardError:
            pass  # what a previous run left is unusable: start again
        check.close()
        unpacker.close()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    check, unpacker = _checked_unpacker(work, layout)
    return check, unpacker, 0


def _stream(
    response: Any, offset: int, *, size: int, check: LayerCheck, unpacker: Unpacker, bar: Progress, digest: str
) -> int:
    import http.client

    interrupted = f"download of {digest} interrupted at {{}} of {size} bytes: pull again to resume"
    # A ring of buffers, reused: fresh 1 MiB buffers cost a page fault per 4 KiB (a second of 2 GiB). A buffer is
    # refilled RING chunks later; by then both hashing threads are done with it, since each queue holds at most
    # QUEUE_MAX chunks and put() blocks beyond that (each thread lags by at most QUEUE_MAX + 1 chunks).
    ring = [memoryview(bytearray(CHUNK)) for _ in range(RING)]
    turn = 0
    try:
        while offset < size:
            buf = ring[turn % RING]
            turn += 1
            n = response.readinto(buf[: min(CHUNK, size - offset)])
            if not n:
                break
            chunk = buf[:n]
            check.update(chunk)
            unpacker.feed(chunk)
            offset += len(chunk)
            bar(len(chunk))
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise RegistryError(interrupted.format(offset)) from exc
    if offset < size:
        raise RegistryError(interrupted.format(offset))
    return offset


# --- sync ----------------------------------------------------------------------------------------------------


def sync(lib: Library, repo: Reference, *, insecure: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Bring the library up to date with the newest signed version of each image in `repo`."""
    client = RegistryClient(repo, insecure=insecure)
    have = {(e.get("image"), e.get("version")) for e in (lib.index(n) for n in lib.names())}
    newest: dict[str, tuple[int, str, str]] = {}
    results: list[dict[str, Any]] = []
    seen: set[str] = set()
    for tag in client.tags():
        if tag.startswith("sha256-"):
            continue  # referrers tag schema
        ref = Reference(repo.registry, repo.repository, tag=tag)
        try:
            body, _, digest = client.get_manifest(tag, (MANIFEST_V1,))
            if digest in seen:
                continue
            seen.add(digest)
            _image_manifest(body)
            envelopes, _ = _envelopes(client, digest)
            _, outcome = _verified_envelope(lib, envelopes, f"{ref}")
        except RollbackError as exc:  # older than a version this host has verified: not wanted, not an error
            results.append({"tag": tag, "status": "superseded", "reason": str(exc)})
            continue
        except HostguardError as exc:
            results.append({"tag": tag, "status": "refused", "reason": str(exc)})
            continue
        facts = outcome.facts
        if facts.name not in newest or facts.version > newest[facts.name][0]:
            newest[facts.name] = (facts.version, digest, tag)
    for image, (version, digest, tag) in sorted(newest.items()):
        if (image, version) in have:
            results.append({"image": image, "version": version, "tag": tag, "status": "up to date"})
            continue
        ref = Reference(repo.registry, repo.repository, tag=tag, digest=digest)
        try:
            entry = pull(lib, ref, client=client, progress=progress)
            results.append({**entry, "tag": tag, "status": "pulled"})
        except HostguardError as exc:
            results.append({"image": image, "version": version, "tag": tag, "status": "failed", "reason": str(exc)})
    return results


def pull_json(entry: dict[str, Any]) -> str:
    return json.dumps(entry, indent=1, default=str)
