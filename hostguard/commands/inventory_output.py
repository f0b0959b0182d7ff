"""Command-line glue for `hostguard manifest create` (the inventory) and `hostguard manifest diff`.

`run_inventory` shows a progress bar on stderr when stderr is a terminal (files and bytes, with an ETA once
the walk has found every component), a one-line summary otherwise, nothing with `quiet`.
`run_diff` prints the difference of two manifest files; exit status 0 when they list the same, 1 when not.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from hostguard.errors import EXIT_ALLOW, EXIT_DENY, FormatError, UsageError
from hostguard.host.fsutil import read_input
from hostguard.imagefs.inventory import InventoryResult, Progress, inventory
from hostguard.imagefs.readers import open_reader
from hostguard.signed.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from hostguard.signed.manifestdiff import diff_manifests, render_text

BAR_WIDTH = 28
SHOW_AFTER = 0.5  # seconds: short inventories print no bar at all


class ProgressBar:
    """`[#####.....] 1234/4000 files  512.0/1024.0 MiB  ETA 0:12` redrawn in place on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False

    def update(self, p: Progress) -> None:
        if p.elapsed < SHOW_AFTER:
            return
        mib_done, mib_found = p.bytes_done / 2**20, p.bytes_found / 2**20
        if p.walking:
            line = f"scanning: {p.files_done}/{p.files_found}+ files, {mib_done:.1f}/{mib_found:.1f}+ MiB hashed"
        else:
            frac = p.bytes_done / p.bytes_found if p.bytes_found else 1.0
            filled = int(BAR_WIDTH * frac)
            rate = p.bytes_done / p.elapsed if p.elapsed > 0 else 0.0
            eta = (p.bytes_found - p.bytes_done) / rate if rate > 0 else 0.0
            line = (
                f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {p.files_done}/{p.files_found} files  "
                f"{mib_done:.1f}/{mib_found:.1f} MiB  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
            )
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def run_inventory(
    images: Sequence[tuple[Path | str, str]],
    reader: str = "auto",
    quiet: bool = False,
    json_summary: bool = False,
    yield_to_others: bool = False,
) -> InventoryResult:
    """Inventory the executable components of `images` ((path, "raw"|"qcow2"), guest disk order).

    Raises `ImageError`/`UsageError`; never returns a partial list. With `json_summary` the summary is
    printed on stdout as one JSON object (the caller may print its own instead, from `result.summary()`).
    """
    bar = ProgressBar(sys.stderr) if not quiet and sys.stderr.isatty() else None
    start = time.monotonic()
    try:
        with open_reader(images, reader) as opened:
            result = inventory(opened, progress=bar.update if bar else None, yield_to_others=yield_to_others)
    finally:
        if bar is not None:
            bar.finish()
    if json_summary:
        json.dump(result.summary(), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    elif not quiet:
        mib = result.hashed_bytes / 2**20
        print(
            f"inventory: {len(result.files)} executable files on {len(result.filesystems)} filesystem(s), "
            f"{mib:.1f} MiB hashed, {result.reader} reader, {time.monotonic() - start:.1f} s",
            file=sys.stderr,
        )
    return result


def _load(
    path: Path, parse: Callable[[bytes], Manifest], read: Callable[[str, str, int], bytes], limit: int
) -> Manifest:
    try:
        return parse(read(str(path), "manifest", limit))
    except FormatError as err:  # a bad input file is a usage error (exit 2), not a "difference" (exit 1)
        raise UsageError(f"{path}: {err}") from None


def run_diff(old_path: Path, new_path: Path, json_output: bool = False) -> int:
    """Print what changed between two manifest files. 0: same files and header; 1: differences."""

    old, new = (_load(p, parse_manifest, read_input, MAX_MANIFEST_BYTES) for p in (old_path, new_path))
    diff = diff_manifests(old, new)
    if json_output:
        json.dump(diff.to_json(), sys.stdout, sort_keys=True, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(diff, f"{old_path} ({old.image})", f"{new_path} ({new.image})"))
    return EXIT_ALLOW if diff.empty else EXIT_DENY
