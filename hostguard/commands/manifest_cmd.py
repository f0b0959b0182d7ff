"""`hostguard manifest create` and `hostguard manifest diff`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

from hostguard.commands.inventory_output import run_diff, run_inventory
from hostguard.errors import EXIT_ALLOW, FormatError, UsageError
from hostguard.host.digest import DigestProcess, FileIdentity, digest_file
from hostguard.host.fsutil import atomic_write
from hostguard.host.qcow2 import looks_like_qcow2, read_qcow2_header
from hostguard.imagefs import ImageSpec
from hostguard.imagefs.disk import content_digest
from hostguard.signed.manifest import Blob, BootFiles, DiskEntry, ImageId, Manifest, parse_boot, parse_time


def parse_expiry(text: str, now: dt.datetime) -> dt.datetime:
    m = re.fullmatch(r"(\d{1,5})d", text)
    if m:
        return now + dt.timedelta(days=int(m.group(1)))
    return parse_time(text, "--expires")


def _checked_format(path: Path, fmt: str | None) -> str:
    """The image's format, refusing format confusion and qcow2 images that reference other files."""

    try:
        with path.open("rb") as fh:
            detected = "qcow2" if looks_like_qcow2(fh.read(4)) else "raw"
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    fmt = fmt or detected
    if fmt == "raw" and detected == "qcow2":
        # A raw image whose first bytes say qcow2 would be probed as qcow2 by careless tools: refuse it.
        raise UsageError(f"{path} looks like qcow2 but --format raw was given")
    if fmt == "qcow2":
        if detected != "qcow2":
            raise UsageError(f"{path} is not a qcow2 image")
        _refuse_external_references(path)
    return fmt


def _refuse_external_references(path: Path) -> None:

    try:
        with path.open("rb") as fh:
            header = read_qcow2_header(fh)
    except FormatError as exc:
        raise UsageError(exc.message) from None
    if header.backing_file is not None:
        raise UsageError(f"{path} has a backing file ({header.backing_file}): sign a standalone image")
    if header.external_data_file:
        raise UsageError(f"{path} uses an external data file: sign a standalone image")


def _content(path: Path, fmt: str, blob: Blob) -> Blob:
    """The digest of the disk as the guest sees it (docs/formats.md): a raw file is its own content; a qcow2's
    virtual disk is read through the fast reader's cluster map (one more pass over its allocated clusters)."""
    if fmt == "raw":
        return blob

    sha, size = content_digest(ImageSpec(path, fmt))
    return Blob(sha, size)


def _check_boot(boot: BootFiles) -> None:
    """Refuse now what `verify` would refuse later: the manifest parser's own rules for the command line."""
    try:
        parse_boot(boot.to_json())
    except FormatError as exc:
        raise UsageError(exc.message) from None


def create(args: argparse.Namespace) -> int:

    if args.image_version < 1:
        raise UsageError("--version must be >= 1")
    if (args.kernel is None) != (args.initrd is None):
        raise UsageError("give --kernel and --initrd together")
    signed_line = args.cmdline is not None or args.cmdline_params is not None
    if signed_line and args.kernel is None:
        raise UsageError("--cmdline and --cmdline-param sign the command line of --kernel: give it")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    images = [Path(p) for p in args.images]
    formats = [_checked_format(p, args.disk_format) for p in images]
    files: tuple[object, ...] = ()
    summary: dict[str, object] = {}
    # The image files' own digests are hashed by child processes beside the inventory: the same bytes
    # cannot feed two SHA-256 streams, so the disk digest is a second full pass, best run on another core.
    jobs: list[DigestProcess] = []
    try:
        for p in images:
            jobs.append(DigestProcess(p))
        if args.reader != "none":
            # The digest children have the longest single stream of work: the inventory's hashing threads
            # yield to them, and take both cores once they are done.
            pairs = list(zip(images, formats, strict=True))
            result = run_inventory(pairs, reader=args.reader, quiet=args.quiet, yield_to_others=True)
            files = result.files
            summary = result.summary()
        digested = [job.result() for job in jobs]
    finally:
        for job in jobs:
            job.close()
    for d in digested:
        if FileIdentity.from_stat(os.stat(d.path)) != d.identity:
            raise UsageError(f"{d.path} changed while it was inventoried: try again on a quiet image")
    disks = tuple(
        DiskEntry(d.blob.sha256, d.blob.size, fmt, _content(d.path, fmt, d.blob))
        for d, fmt in zip(digested, formats, strict=True)
    )
    boot = None
    if args.kernel:
        k = digest_file(Path(args.kernel)).blob
        i = digest_file(Path(args.initrd)).blob
        params = tuple(args.cmdline_params) if args.cmdline_params is not None else None
        boot = BootFiles(kernel=k, initrd=i, cmdline=args.cmdline, cmdline_params=params)
        _check_boot(boot)
    manifest = Manifest(
        image=ImageId(args.name, args.image_version),
        created=now,
        expires=parse_expiry(args.expires, now),
        disks=disks,
        files=files,  # type: ignore[arg-type]
        boot=boot,
    )
    if manifest.expires <= now:
        raise UsageError("--expires must be in the future")
    atomic_write(Path(args.output), manifest.to_bytes())
    if args.json:
        json.dump(
            {
                "manifest": args.output,
                "image": str(manifest.image),
                "disks": len(disks),
                "files": len(manifest.files),
                **summary,
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
    elif not args.quiet:
        print(
            f"wrote {args.output}: {manifest.image}, {len(disks)} disk(s), {len(manifest.files)} file(s)",
            file=sys.stderr,
        )
    return EXIT_ALLOW


def diff(args: argparse.Namespace) -> int:

    return run_diff(Path(args.old), Path(args.new), json_output=args.json)
