"""The kernel's crc32c_le(seed, data), shared by the ext4 reader (metadata_csum), the jbd2 journal replay, the
XFS log and Btrfs.

No pre- or post-inversion, as the kernel's ext4_chksum/jbd2_chksum use it: the libraries below invert both, so
the seed and result are inverted around them. The `crc32c` package computes with the CPU's CRC32 instructions
(SSE 4.2, ARMv8): ~0.3 µs per 4 KiB block on this host against ~41 µs for dissect.util's pure-Python table,
which was most of the cost of replaying a journal block and of reading a Btrfs tree. dissect.util's is the
fallback where `crc32c` is missing. Imported on first use (not on import: the hook's start-up path must stay
light).
"""

from __future__ import annotations

from collections.abc import Callable

_IMPL: list[Callable[[bytes, int], int]] = []


def _implementation() -> Callable[[bytes, int], int]:
    try:
        from crc32c import crc32c as fast

        return fast
    except ImportError:
        from dissect.util.hash import crc32c

        return getattr(crc32c, "crc32c", crc32c)  # type: ignore[no-any-return]


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """crc32c_le(seed, data) as the kernel computes it."""
    if not _IMPL:
        _IMPL.append(_implementation())
    return int(_IMPL[0](bytes(data), seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF
