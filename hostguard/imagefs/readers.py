"""Open disk images with a guest-filesystem reader: the fast host-side one when it can read everything, else
libguestfs. A module of its own because both readers build on the base types of `hostguard.imagefs`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hostguard.errors import ImageError, UsageError
from hostguard.imagefs import (
    DEFAULT_LIMITS,
    MALFORMED_INPUT_ERRORS,
    READER_CHOICES,
    GuestFilesystemReader,
    Limits,
    UnsupportedLayout,
    image_specs,
)
from hostguard.imagefs.fast import FastReader
from hostguard.imagefs.guestfs_reader import GuestfsReader


def open_reader(
    images: Sequence[tuple[Path | str, str]],
    reader: str = "auto",
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> GuestFilesystemReader:
    """Open `images` ((path, "raw"|"qcow2") in guest disk order) with the chosen reader.

    "auto": the fast reader if it supports every filesystem found (ext2/3/4 or XFS on whole disks, MBR/GPT
    partitions or linear LVM volumes, nothing it cannot read), else libguestfs. "fast" refuses unsupported
    layouts with an `ImageError` that says to use the guestfs reader.
    """
    specs = image_specs(images)
    if reader not in READER_CHOICES:
        raise UsageError(f"reader must be one of {', '.join(READER_CHOICES)}, not {reader!r}")
    if reader in ("auto", "fast"):
        try:
            return FastReader(specs, limits=limits)
        except UnsupportedLayout as why:
            if reader == "fast":
                raise ImageError(f"{why.message}; use --reader guestfs") from None
        except MALFORMED_INPUT_ERRORS as err:
            names = ", ".join(str(s.path) for s in specs)
            raise ImageError(f"{names}: malformed disk data ({type(err).__name__}: {err})") from None
    return GuestfsReader(specs, limits=limits)
