"""security.capability decoding: known values, malformed values, and agreement with the real getcap."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import FormatError
from hostguard.imagefs.capabilities import (
    FileCapabilities,
    capability_text,
    caps_to_text,
    parse_capability_xattr,
)
from tests.testbed.prereq import require, require_root

NET_RAW = 1 << 13
NET_ADMIN = 1 << 12
ALL_NAMED = (1 << 41) - 1


def v2(permitted: int, inheritable: int = 0, *, effective: bool = True) -> bytes:
    magic = 0x02000000 | (1 if effective else 0)
    return struct.pack(
        "<IIIII", magic, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF, permitted >> 32, inheritable >> 32
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (v2(NET_RAW), "cap_net_raw=ep"),
        (v2(NET_RAW, effective=False), "cap_net_raw=p"),
        (v2(0, NET_RAW, effective=False), "cap_net_raw=i"),
        (v2(NET_RAW, NET_RAW), "cap_net_raw=eip"),
        (v2(NET_RAW | NET_ADMIN), "cap_net_admin,cap_net_raw=ep"),
        (v2(ALL_NAMED), "=ep"),
        (v2(ALL_NAMED, 1, effective=False), "=p cap_chown+i"),
        (v2(ALL_NAMED & ~1, 1, effective=False), "=p cap_chown+i-p"),
        (v2(NET_RAW | 1 << 41), "cap_net_raw=ep 41+ep"),
        (v2((1 << 64) - 1), "=ep 41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63+ep"),
        (v2(0, effective=False), "="),
        (struct.pack("<III", 0x01000001, NET_RAW, 0), "cap_net_raw=ep"),
        (struct.pack("<IIIIII", 0x03000001, NET_RAW, 0, 0, 0, 0), "cap_net_raw=ep"),
        (struct.pack("<IIIIII", 0x03000001, NET_RAW, 0, 0, 0, 1000), "cap_net_raw=ep [rootid=1000]"),
    ],
)
def test_known_values(value: bytes, text: str) -> None:
    assert capability_text(value) == text


def test_parse_fields() -> None:
    caps = parse_capability_xattr(struct.pack("<IIIIII", 0x03000001, NET_RAW, 2, 1, 0, 7))
    assert caps == FileCapabilities(revision=3, effective=True, permitted=NET_RAW | 1 << 32, inheritable=2, rootid=7)


def test_revision1_ignores_nothing_beyond_32_bits() -> None:
    caps = parse_capability_xattr(struct.pack("<III", 0x01000000, 0xFFFFFFFF, 0))
    assert caps.permitted == 0xFFFFFFFF and caps.revision == 1


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x00",
        struct.pack("<I", 0x04000000) + bytes(16),  # unknown revision
        struct.pack("<I", 0x00000001) + bytes(16),  # revision 0
        v2(NET_RAW)[:-1],  # v2 short
        v2(NET_RAW) + b"\x00",  # v2 long
        struct.pack("<III", 0x01000001, NET_RAW, 0) + bytes(8),  # v1 with v2's size
        struct.pack("<IIIII", 0x03000001, NET_RAW, 0, 0, 0),  # v3 without rootid
    ],
)
def test_malformed_values_refused(value: bytes) -> None:
    with pytest.raises(FormatError):
        capability_text(value)


def test_text_of_constructed_caps() -> None:
    assert caps_to_text(FileCapabilities(2, True, NET_RAW, 0)) == "cap_net_raw=ep"


# --- agreement with libcap's getcap ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cap_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require(shutil.which("getcap") is not None, "getcap (libcap2-bin) is not installed")
    # getcap names as many capabilities as the running kernel knows; hostguard fixes that at 41.
    last = Path("/proc/sys/kernel/cap_last_cap").read_text().strip()
    require(last == "40", f"the host kernel knows {int(last) + 1} capabilities, getcap's text would differ")
    path = tmp_path_factory.mktemp("caps") / "f"
    path.write_bytes(b"x")
    try:
        os.setxattr(path, "security.capability", v2(NET_RAW))
    except OSError as err:
        require(False, f"cannot set security.capability on {path}: {err}")
    return path


_masks = st.one_of(
    st.just(0),
    st.just(ALL_NAMED),
    st.just((1 << 64) - 1),
    st.integers(0, ALL_NAMED),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 40).map(lambda b: ALL_NAMED & ~(1 << b)),
    st.integers(0, 40).map(lambda b: 1 << b),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(permitted=_masks, inheritable=_masks, effective=st.booleans())
def test_matches_getcap(cap_file: Path, permitted: int, inheritable: int, effective: bool) -> None:
    value = v2(permitted, inheritable, effective=effective)
    os.setxattr(cap_file, "security.capability", value)
    out = subprocess.run(["getcap", str(cap_file)], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"{cap_file} {capability_text(value)}"
