"""The kernel's crc32c_le(seed, data), shared by the ext4 reader (metadata_csum) and the jbd2 journal replay.

No pre- or post-inversion, as the kernel's ext4_chksum/jbd2_chksum use it: dissect.util's crc32c inverts both,
so the seed and result are inverted around it. dissect.util is imported on first use (not on import: the
hook's start-up path must stay light).
"""

from __future__ import annotations

from collections.abc import Callable

_IMPL: list[Callable[[bytes, int], int]] = []


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """crc32c_le(seed, data) as the kernel computes it."""
    if not _IMPL:
        from dissect.util.hash import crc32c

        _IMPL.append(getattr(crc32c, "crc32c", crc32c))
    return int(_IMPL[0](bytes(data), seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF
