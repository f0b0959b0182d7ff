"""crc32c_raw: the kernel's crc32c_le, in hardware (the `crc32c` package) and by dissect.util's table (the
fallback) alike; the check value of the CRC-32C catalogue and random data of every length up to two blocks."""

from __future__ import annotations

import random

import pytest

from hostguard.imagefs import crc32c as module
from hostguard.imagefs.crc32c import crc32c_raw
from tests.testbed.prereq import require_module


def test_check_value_of_the_crc_catalogue() -> None:
    assert crc32c_raw(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert crc32c_raw(0xFFFFFFFF, memoryview(bytearray(b"123456789"))) ^ 0xFFFFFFFF == 0xE3069283


def test_hardware_and_table_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = require_module("crc32c").crc32c
    from dissect.util.hash import crc32c as table_module

    table = getattr(table_module, "crc32c", table_module)
    rng = random.Random(21)
    for length in [*range(0, 70), 4095, 4096, 8192]:
        data, seed = rng.randbytes(length), rng.getrandbits(32)
        assert fast(data, seed) == table(data, seed), length
    monkeypatch.setattr(module, "_IMPL", [])
    crc32c_raw(0, b"")
    assert module._IMPL[0] is fast  # the hardware one is what the readers use when it is installed
