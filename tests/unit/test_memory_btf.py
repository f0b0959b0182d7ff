"""The BTF reader: offsets the walker relies on, and hostile blobs (from guest memory) that must not crash it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostguard.errors import FormatError
from hostguard.memory import btf as B
from hostguard.memory.btf import Btf
from tests.unit.memory_fakes import BtfBuilder


def sample() -> tuple[BtfBuilder, dict[str, int]]:
    """struct list_head; struct qstr {u32 hash; u32 len; const char *name}; struct task with an anonymous
    union, a typedef'd member, an array and a nested struct by value."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    u32 = ids["u32"] = b.int_("unsigned int", 4)
    u64 = ids["u64"] = b.int_("unsigned long", 8)
    char = b.int_("char", 1)
    cptr = b.ptr(b.const(char))
    lh_ptr_placeholder = b.fwd("list_head")
    lh = ids["list_head"] = b.struct(
        "list_head", 16, [("next", b.ptr(lh_ptr_placeholder), 0), ("prev", b.ptr(lh_ptr_placeholder), 64)]
    )
    pid_t = b.typedef("pid_t", b.typedef("__kernel_pid_t", b.int_("int", 4)))
    ids["qstr"] = qstr = b.struct("qstr", 16, [("hash", u32, 0), ("len", u32, 32), ("name", cptr, 64)])
    comm = b.array(char, u32, 16)
    anon = b.struct("", 8, [("a", u32, 0), ("b", u32, 32)], union=True)
    inner_anon = b.struct("", 8, [("deep", u64, 0)])
    outer_anon = b.struct("", 8, [("", inner_anon, 0)], union=True)
    ids["task"] = b.struct(
        "task",
        80,
        [
            ("tasks", lh, 0),
            ("pid", pid_t, 128),
            ("", anon, 192),
            ("name", qstr, 256),
            ("comm", comm, 384),
            ("", outer_anon, 512),
        ],
    )
    return b, ids


def test_offsets_sizes_and_nested_paths() -> None:
    b, _ = sample()
    btf = Btf(b.build())
    assert btf.offsetof("task", "tasks") == 0
    assert btf.member("task", "pid").offset == 16 and btf.member("task", "pid").size == 4  # through 2 typedefs
    assert btf.member("task", "name.len").offset == 32 + 4
    assert btf.member("task", "name.name").size == 8
    assert btf.member("task", "comm").size == 16 and btf.array_length(btf.member("task", "comm")) == 16
    assert btf.sizeof("task") == 80 and btf.sizeof("qstr") == 16
    assert btf.member("list_head", "prev").offset == 8


def test_anonymous_unions_and_structs_are_looked_through() -> None:
    b, _ = sample()
    btf = Btf(b.build())
    assert btf.offsetof("task", "a") == 24 and btf.offsetof("task", "b") == 28
    assert btf.offsetof("task", "deep") == 64  # two anonymous levels


def test_forward_declarations_do_not_shadow_the_complete_struct() -> None:
    b = BtfBuilder()
    b.fwd("thing")
    b.struct("thing", 8, [("x", b.int_("long", 8), 0)])
    assert Btf(b.build()).offsetof("thing", "x") == 0


@pytest.mark.parametrize(
    ("struct_name", "path", "message"),
    [("nope", "x", "no struct nope"), ("task", "missing", "no member missing"), ("task", "pid.x", "no member pid.x")],
)
def test_missing_structs_and_members_are_format_errors(struct_name: str, path: str, message: str) -> None:
    b, _ = sample()
    with pytest.raises(FormatError, match=message):
        Btf(b.build()).member(struct_name, path)


def test_bitfields_are_refused() -> None:
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    b.struct("flags", 4, [("a", u32, (3 << 24) | 0), ("b", u32, (5 << 24) | 3)], kflag=True)
    btf = Btf(b.build())
    assert btf.offsetof("flags", "a") == 0
    with pytest.raises(FormatError, match="bit field"):
        btf.offsetof("flags", "b")


def test_real_kinds_are_skipped_with_their_trailers() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4)
    b.enum("colour", {"RED": 0, "GREEN": 1})
    b.func_proto(i, [i, i])
    b.struct("after", 4, [("x", i, 0)])
    assert Btf(b.build()).offsetof("after", "x") == 0


# --- hostile blobs -----------------------------------------------------------------------------------------------


def header(magic: int = B.BTF_MAGIC, version: int = 1, hdr_len: int = 24, type_len: int = 0, str_len: int = 1) -> bytes:
    return struct.pack("<HBBIIIII", magic, version, 0, hdr_len, 0, type_len, type_len, str_len)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x9f\xeb", "shorter than its header"),
        (header(magic=0x9FEB) + b"\0", "bad magic"),
        (header(version=2) + b"\0", "unsupported version"),
        (header(hdr_len=4) + b"\0", "bad header length"),
        (header(type_len=12) + b"\0", "outside the blob"),
        (header(str_len=2) + b"x", "outside the blob"),
        (header(str_len=1) + b"x", "not NUL-terminated"),
    ],
)
def test_malformed_headers(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Btf(blob)


def raw_types(*records: bytes, strings: bytes = b"\0") -> bytes:
    types = b"".join(records)
    return header(type_len=len(types), str_len=len(strings)) + types + strings


def test_unknown_kind_dangling_reference_and_bad_strings() -> None:
    with pytest.raises(FormatError, match="unknown type kind"):
        Btf(raw_types(struct.pack("<III", 0, 30 << 24, 0)))
    with pytest.raises(FormatError, match="does not exist"):
        Btf(raw_types(struct.pack("<III", 0, B.PTR << 24, 7)))
    with pytest.raises(FormatError, match="string offset"):
        Btf(raw_types(struct.pack("<III", 99, B.FWD << 24, 0)))
    with pytest.raises(FormatError, match="truncated"):
        Btf(raw_types(struct.pack("<III", 0, (B.STRUCT << 24) | 5, 8)))  # 5 members announced, none there
    with pytest.raises(FormatError, match="over-long name"):
        Btf(raw_types(struct.pack("<III", 1, B.FWD << 24, 0), strings=b"\0" + b"n" * 2000 + b"\0"))


def test_typedef_cycles_end_in_an_error_not_a_hang() -> None:
    # typedef 1 -> 2 -> 1: a chain a real compiler never emits, a hostile guest could
    blob = raw_types(
        struct.pack("<III", 1, B.TYPEDEF << 24, 2),
        struct.pack("<III", 1, B.TYPEDEF << 24, 1),
        struct.pack("<III", 3, (B.STRUCT << 24) | 1, 8) + struct.pack("<III", 5, 1, 0),
        strings=b"\0t\0s\0x\0",
    )
    btf = Btf(blob)
    with pytest.raises(FormatError, match="chain too long"):
        btf.member("s", "x")


def test_self_containing_anonymous_members_end_in_an_error() -> None:
    blob = raw_types(struct.pack("<III", 1, (B.STRUCT << 24) | 1, 8) + struct.pack("<III", 0, 1, 0), strings=b"\0s\0")
    with pytest.raises(FormatError, match="nested too deeply"):
        Btf(blob).member("s", "x")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_blobs_parse_or_raise_format_error(data: st.DataObject) -> None:
    b, _ = sample()
    blob = bytearray(b.build())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        btf = Btf(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob))
        for path in ("tasks", "pid", "name.len", "comm", "a", "deep"):
            btf.member("task", path)
    except FormatError:
        pass


def test_self_containing_array_ends_in_an_error() -> None:
    blob = raw_types(
        struct.pack("<III", 0, B.ARRAY << 24, 0) + struct.pack("<III", 1, 1, 4),
        struct.pack("<III", 1, (B.STRUCT << 24) | 1, 8) + struct.pack("<III", 3, 1, 0),
        strings=b"\0s\0x\0",
    )
    with pytest.raises(FormatError, match="nested too deeply"):
        Btf(blob).member("s", "x")
