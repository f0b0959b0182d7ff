"""hostguard.host.qcow2: real qemu-img images read correctly; corrupt or hostile headers are refused: FormatError."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.errors import FormatError, ImageError
from hostguard.host.qcow2 import (
    EXT_BACKING_FORMAT,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    EXT_FEATURE_NAMES,
    MAX_EXTENSIONS,
    Qcow2Header,
    looks_like_qcow2,
    read_qcow2_header,
    resolve_backing_path,
)
from tests.testbed.prereq import require_tool

MiB = 1024 * 1024

# name -> qemu-img create arguments after "-f qcow2" (the target file and size are appended)
RECIPES: dict[str, list[str]] = {
    "plain": [],
    "v2": ["-o", "compat=0.10"],
    "overlay-raw": ["-b", "base.raw", "-F", "raw"],
    "overlay-qcow2": ["-b", "plain.qcow2", "-F", "qcow2"],
    "v2-overlay": ["-o", "compat=0.10", "-b", "plain.qcow2", "-F", "qcow2"],
    "data-file": ["-o", "data_file={dir}/data-file.raw"],
    "data-file-raw": ["-o", "data_file={dir}/data-file-raw.raw,data_file_raw=on"],
    "luks": [
        "--object",
        "secret,id=sec0,data=hostguard",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100",
    ],
    "aes": ["--object", "secret,id=sec0,data=hostguard", "-o", "encrypt.format=aes,encrypt.key-secret=sec0"],
    "zstd": ["-o", "compression_type=zstd"],
    "extended-l2": ["-o", "extended_l2=on,cluster_size=2M"],
    "small-clusters": ["-o", "cluster_size=512"],
}


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qemu_img = require_tool("qemu-img")
    path = tmp_path_factory.mktemp("qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(path / "base.raw"), "1M"], check=True)
    return path


@pytest.fixture(scope="session")
def image(image_dir: Path) -> Callable[[str], Path]:
    """Build (once per session, on first use) the qemu-img image of a RECIPES entry, in `image_dir`."""
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            if name != "plain" and any("plain.qcow2" in arg for arg in RECIPES[name]):
                make("plain")
            args = [arg.format(dir=image_dir) for arg in RECIPES[name]]
            target = image_dir / f"{name}.qcow2"
            for _attempt in range(6):
                proc = subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", *args, str(target), "16M"],
                    cwd=image_dir,
                    capture_output=True,
                    text=True,
                )
                # QEMU's LUKS PBKDF calibration sometimes fails with "Unable to get accurate CPU usage"
                # (getrusage granularity); that flake, and only that one, is worth another try.
                if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
                    break
            assert proc.returncode == 0, f"qemu-img create {name}: {proc.stderr.strip()}"
            built[name] = target
        return built[name]

    return make


def header_of(path: Path) -> Qcow2Header:
    with path.open("rb") as fh:
        return read_qcow2_header(fh)


def header_from_bytes(data: bytes | bytearray, name: str = "img.qcow2") -> Qcow2Header:
    return read_qcow2_header(io.BytesIO(bytes(data)), name=name)


def refused(data: bytes | bytearray, match: str, offset: int | None = None) -> FormatError:
    with pytest.raises(FormatError, match=match) as info:
        header_from_bytes(data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("format: qcow2 img.qcow2: offset "), message
    if offset is not None:
        assert message.startswith(f"format: qcow2 img.qcow2: offset {offset}: "), message
    return info.value


def first_cluster(path: Path) -> bytearray:
    return bytearray(path.read_bytes()[:65536])


def add_extensions(data: bytearray, start: int, entries: list[tuple[int, bytes]]) -> bytearray:
    """Rewrite the extension area at `start` with `entries` and an end marker."""
    pos = start
    for ext_type, payload in entries:
        padded = payload + b"\0" * (-len(payload) % 8)
        data[pos : pos + 8 + len(padded)] = struct.pack(">II", ext_type, len(payload)) + padded
        pos += 8 + len(padded)
    data[pos : pos + 8] = b"\0" * 8
    return data


# --- real images --------------------------------------------------------------------------------------------


def test_plain_v3_image(image: Callable[[str], Path]) -> None:
    h = header_of(image("plain"))
    assert (h.version, h.header_length, h.cluster_bits, h.cluster_size) == (3, 112, 16, 65536)
    assert h.virtual_size == 16 * MiB
    assert (h.backing_file, h.backing_format, h.data_file) == (None, None, None)
    assert not h.encrypted and h.encryption is None
    assert not h.external_data_file and not h.dirty and not h.corrupt
    assert h.refcount_order == 4 and h.compression == "zlib"
    assert h.extension_types == (EXT_FEATURE_NAMES,)


def test_overlay_on_raw_base(image: Callable[[str], Path]) -> None:
    h = header_of(image("overlay-raw"))
    assert (h.backing_file, h.backing_format) == ("base.raw", "raw")
    assert EXT_BACKING_FORMAT in h.extension_types


def test_overlay_on_qcow2_base(image: Callable[[str], Path]) -> None:
    h = header_of(image("overlay-qcow2"))
    assert (h.backing_file, h.backing_format) == ("plain.qcow2", "qcow2")


def test_overlay_with_absolute_backing_name(image_dir: Path, image: Callable[[str], Path]) -> None:
    base = image("plain")
    overlay = image_dir / "absolute-overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True
    )
    h = header_of(overlay)
    assert h.backing_file == str(base)
    assert resolve_backing_path(overlay, h.backing_file) == base


def test_v2_image_compat_0_10(image: Callable[[str], Path]) -> None:
    h = header_of(image("v2"))
    assert (h.version, h.header_length, h.incompatible_features, h.refcount_order) == (2, 72, 0, 4)
    assert h.extension_types == ()


def test_v2_overlay_keeps_backing_format_extension(image: Callable[[str], Path]) -> None:
    h = header_of(image("v2-overlay"))
    assert (h.version, h.backing_file, h.backing_format) == (2, "plain.qcow2", "qcow2")


def test_external_data_file(image_dir: Path, image: Callable[[str], Path]) -> None:
    h = header_of(image("data-file"))
    assert h.data_file == str(image_dir / "data-file.raw")
    assert h.external_data_file
    assert h.incompatible_features & 4
    assert EXT_DATA_FILE in h.extension_types


def test_external_raw_data_file(image: Callable[[str], Path]) -> None:
    h = header_of(image("data-file-raw"))
    assert h.external_data_file and h.autoclear_features & 2


def test_luks_encrypted_image(image: Callable[[str], Path]) -> None:
    h = header_of(image("luks"))
    assert (h.crypt_method, h.encryption, h.encrypted) == (2, "luks", True)
    assert EXT_CRYPTO_HEADER in h.extension_types


def test_legacy_aes_encrypted_image(image: Callable[[str], Path]) -> None:
    h = header_of(image("aes"))
    assert (h.crypt_method, h.encryption) == (1, "aes")


def test_zstd_compression(image: Callable[[str], Path]) -> None:
    h = header_of(image("zstd"))
    assert (h.compression_type, h.compression, h.incompatible_features) == (1, "zstd", 8)


def test_extended_l2_with_2m_clusters(image: Callable[[str], Path]) -> None:
    h = header_of(image("extended-l2"))
    assert (h.cluster_bits, h.incompatible_features) == (21, 16)


def test_512_byte_clusters(image: Callable[[str], Path]) -> None:
    assert header_of(image("small-clusters")).cluster_size == 512


def test_raw_fd_opened_with_o_nofollow(image: Callable[[str], Path]) -> None:
    path = image("overlay-raw")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.lseek(fd, 5, os.SEEK_SET)
        h = read_qcow2_header(fd, name=str(path))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 5  # pread leaves the caller's offset alone
    finally:
        os.close(fd)
    assert h == header_of(path)


def test_file_name_is_the_default_label(tmp_path: Path) -> None:
    path = tmp_path / "zeros.img"
    path.write_bytes(b"\0" * 4096)
    with path.open("rb") as fh, pytest.raises(FormatError, match=f"qcow2 {path}: offset 0: not a qcow2 image"):
        read_qcow2_header(fh)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(FormatError, match=f"qcow2 fd {fd}: offset 0"):
            read_qcow2_header(fd)
    finally:
        os.close(fd)


def test_io_errors_are_image_errors(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ImageError, match="cannot read"):
            read_qcow2_header(fd, name="a directory")
    finally:
        os.close(fd)
    closed = io.BytesIO(b"QFI\xfb")
    closed.close()
    with pytest.raises(ImageError, match="cannot read"):
        read_qcow2_header(closed)


def test_looks_like_qcow2(image: Callable[[str], Path], tmp_path: Path) -> None:
    assert looks_like_qcow2(image("plain").read_bytes()[:512])
    assert looks_like_qcow2(image("v2").read_bytes()[:4])
    assert not looks_like_qcow2(b"\0" * 512)
    assert not looks_like_qcow2(b"QFI")
    assert not looks_like_qcow2(b"")
    # A raw disk whose guest wrote a qcow2 header at sector 0: it looks like qcow2 and must not be probed.
    raw = tmp_path / "guest-controlled.raw"
    raw.write_bytes(image("overlay-raw").read_bytes()[:4096] + b"\0" * 4096)
    assert looks_like_qcow2(raw.read_bytes()[:512])


# --- backing path resolution ----------------------------------------------------------------------------------


def test_relative_backing_resolves_like_qemu(image_dir: Path, image: Callable[[str], Path]) -> None:
    image("plain")
    sub = image_dir / "sub"
    sub.mkdir(exist_ok=True)
    overlay = sub / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../plain.qcow2", "-F", "qcow2", str(overlay)], check=True
    )
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], check=True, capture_output=True).stdout
    )
    h = header_of(overlay)
    assert h.backing_file == "../plain.qcow2"
    resolved = resolve_backing_path(overlay, h.backing_file)
    assert str(resolved) == info["full-backing-filename"]  # ".." kept, as QEMU does: no lexical normalisation
    assert resolved.exists()


@pytest.mark.parametrize(
    ("overlay", "name", "expected"),
    [
        ("/img/web/os.qcow2", "base.qcow2", "/img/web/base.qcow2"),
        ("/img/web/os.qcow2", "./base.qcow2", "/img/web/base.qcow2"),
        ("/img/web/os.qcow2", "../gold/base.qcow2", "/img/web/../gold/base.qcow2"),
        ("/img/web/os.qcow2", "/srv/base.qcow2", "/srv/base.qcow2"),
        ("/img/web/os.qcow2", "./odd:name.qcow2", "/img/web/odd:name.qcow2"),
        ("/img/web/os.qcow2", "/srv/odd:name", "/srv/odd:name"),
    ],
)
def test_resolve_backing_path(overlay: str, name: str, expected: str) -> None:
    assert resolve_backing_path(overlay, name) == Path(expected)


@pytest.mark.parametrize(
    "name",
    [
        "nbd:localhost:10809",
        "nbd://10.0.0.1/export",
        'json:{"driver":"http","url":"http://evil/x"}',
        "http://evil.example/base.qcow2",
        "file:/etc/shadow",
        "odd:name.qcow2",
    ],
)
def test_protocol_backing_names_are_refused(name: str) -> None:
    with pytest.raises(FormatError, match="is a protocol name, not a local file"):
        resolve_backing_path("/img/os.qcow2", name)


@pytest.mark.parametrize(("name", "match"), [("", "empty backing file name"), ("a\0b", "NUL")])
def test_degenerate_backing_names_are_refused(name: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        resolve_backing_path("/img/os.qcow2", name)


# --- hand-corrupted headers -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def v3(image: Callable[[str], Path]) -> bytes:
    return bytes(first_cluster(image("plain")))


@pytest.fixture(scope="session")
def overlay(image: Callable[[str], Path]) -> bytes:
    return bytes(first_cluster(image("overlay-qcow2")))


def patched(data: bytes, fmt: str, offset: int, value: int) -> bytearray:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return out


@pytest.mark.parametrize(("size", "offset"), [(0, 0), (3, 0), (6, 4), (50, 50), (80, 80)])
def test_truncated_header_is_refused(v3: bytes, size: int, offset: int) -> None:
    refused(v3[:size], "not a qcow2 image|ends inside", offset)


def test_truncated_extension_area_is_refused(v3: bytes) -> None:
    refused(v3[:116], "run past the end of the file", 112)


def test_truncated_extension_data_is_refused(v3: bytes) -> None:
    refused(v3[:200], "runs past the end of the file", 112)


def test_wrong_magic_is_refused(v3: bytes) -> None:
    err = refused(b"QFI\xfa" + v3[4:], "not a qcow2 image", 0)
    assert "QFI" in str(err)


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version_is_refused(v3: bytes, version: int) -> None:
    refused(patched(v3, ">I", 4, version), f"unsupported qcow2 version {version}", 4)


@pytest.mark.parametrize("length", [0, 72, 100, 108, 0xFFFFFFF8])
def test_absurd_header_length_is_refused(v3: bytes, length: int) -> None:
    refused(patched(v3, ">I", 100, length), "header length", 100)


@pytest.mark.parametrize("bits", [0, 8, 22, 64, 0xFFFFFFFF])
def test_absurd_cluster_bits_are_refused(v3: bytes, bits: int) -> None:
    refused(patched(v3, ">I", 20, bits), "cluster_bits", 20)


def test_header_longer_than_a_small_cluster_is_refused(image: Callable[[str], Path]) -> None:
    data = first_cluster(image("small-clusters"))
    refused(patched(bytes(data), ">I", 100, 520), "exceeds the cluster size 512", 100)


def test_unknown_incompatible_feature_is_refused(v3: bytes) -> None:
    refused(patched(v3, ">Q", 72, 1 << 5), "unknown incompatible feature bits 0x20", 72)


def test_unknown_compatible_feature_is_accepted(v3: bytes) -> None:
    assert header_from_bytes(patched(v3, ">Q", 80, 1 << 40)).compatible_features == 1 << 40


@pytest.mark.parametrize(
    ("fmt", "offset", "value", "match"),
    [
        (">I", 32, 3, "unknown encryption method 3"),
        (">Q", 24, 1 << 63, "virtual size"),
        (">I", 96, 7, "refcount order 7"),
        (">Q", 40, 65536 + 512, "l1_table_offset .* not aligned"),
        (">Q", 48, 12345, "refcount_table_offset .* not aligned"),
        (">Q", 72, 8, "does not match incompatible feature bit 3"),  # zstd bit, zlib type
        (">Q", 88, 2, "raw external data bit set without an external data file"),
    ],
)
def test_inconsistent_header_field_is_refused(v3: bytes, fmt: str, offset: int, value: int, match: str) -> None:
    refused(patched(v3, fmt, offset, value), match)


def test_unknown_compression_type_is_refused(v3: bytes) -> None:
    data = patched(v3, ">Q", 72, 8)
    data[104] = 7
    refused(data, "unknown compression type 7", 104)


def test_extended_l2_needs_16k_clusters(image: Callable[[str], Path]) -> None:
    data = first_cluster(image("small-clusters"))
    refused(patched(bytes(data), ">Q", 72, 16), "extended L2 entries need clusters of at least 16 KiB", 20)


def test_luks_method_without_its_extension_is_refused(v3: bytes) -> None:
    refused(patched(v3, ">I", 32, 2), "encryption header extension does not match", 112)


def test_luks_extension_without_luks_method_is_refused(v3: bytes) -> None:
    data = add_extensions(bytearray(v3), 112, [(EXT_CRYPTO_HEADER, b"\0" * 16)])
    refused(data, "encryption header extension does not match")


def test_overlong_header_extension_is_refused(v3: bytes) -> None:
    refused(patched(v3, ">I", 116, 0xFFFFFFFF), "of 4294967295 bytes is too long", 112)


def test_extension_longer_than_the_space_before_the_backing_name_is_refused(overlay: bytes) -> None:
    backing_offset = struct.unpack_from(">Q", overlay, 8)[0]
    refused(patched(overlay, ">I", 116, backing_offset - 112 - 8 + 1), "too long", 112)


def test_extension_header_crossing_the_area_end_is_refused(overlay: bytes) -> None:
    # Backing name starts 4 bytes into where the next extension header would be: QEMU refuses that too.
    data = add_extensions(bytearray(overlay), 112, [(0x12345678, b"")])
    data = patched(bytes(data), ">Q", 8, 124)
    data[124:134] = b"base.qcow2"
    refused(patched(bytes(data), ">I", 16, 10), "crosses the end of the extension area", 120)


def test_duplicate_extension_is_refused(v3: bytes) -> None:
    data = add_extensions(bytearray(v3), 112, [(EXT_BACKING_FORMAT, b"raw"), (EXT_BACKING_FORMAT, b"qcow2")])
    refused(data, "header extension 0xe2792aca appears twice", 128)


def test_extension_flood_is_refused(v3: bytes) -> None:
    data = add_extensions(bytearray(v3), 112, [(0x1000 + i, b"") for i in range(MAX_EXTENSIONS + 1)])
    refused(data, f"more than {MAX_EXTENSIONS} header extensions")


def test_extension_flood_over_a_2m_cluster_stays_bounded(image: Callable[[str], Path]) -> None:
    data = bytearray(image("extended-l2").read_bytes()[: 2 * MiB])
    data = add_extensions(data, 112, [(0x1000 + i, b"") for i in range(2 * MiB // 8 - 20)])
    refused(data, f"more than {MAX_EXTENSIONS} header extensions")


def test_extension_area_without_end_marker_is_accepted_like_qemu(v3: bytes) -> None:
    # Fill the first cluster exactly with one unknown extension: QEMU stops at the cluster end.
    data = add_extensions(bytearray(v3), 112, [(0x12345678, b"\xaa" * (65536 - 112 - 8))])
    assert header_from_bytes(data[:65536]).extension_types == (0x12345678,)


def test_backing_name_offset_beyond_the_file_is_refused(overlay: bytes) -> None:
    data = patched(overlay, ">Q", 8, 60000)
    refused(data[:4096], "backing file name .* extends beyond the end of the file", 60000)


@pytest.mark.parametrize(
    ("offset", "match"), [(65536 + 8, "outside the first cluster"), (64, "outside the first cluster")]
)
def test_backing_name_offset_outside_the_first_cluster_is_refused(overlay: bytes, offset: int, match: str) -> None:
    refused(patched(overlay, ">Q", 8, offset), match, 8)


@pytest.mark.parametrize("size", [1024, 0xFFFFFFFF])
def test_overlong_backing_name_is_refused(overlay: bytes, size: int) -> None:
    refused(patched(overlay, ">I", 16, size), f"backing file name length {size} is too long", 16)


def test_backing_name_with_nul_is_refused(overlay: bytes) -> None:
    backing_offset = struct.unpack_from(">Q", overlay, 8)[0]
    data = bytearray(overlay)
    data[backing_offset + 4] = 0  # "plai\0.qcow2": QEMU would open "plai"
    refused(data, "backing file name contains a NUL byte", backing_offset + 4)


def test_backing_name_not_utf8_is_refused(overlay: bytes) -> None:
    backing_offset = struct.unpack_from(">Q", overlay, 8)[0]
    data = bytearray(overlay)
    data[backing_offset] = 0xFF
    refused(data, "backing file name is not valid UTF-8", backing_offset)


def test_empty_backing_name_is_refused(overlay: bytes) -> None:
    refused(patched(overlay, ">I", 16, 0), "backing file name is empty")


def test_backing_without_format_extension_has_no_format(overlay: bytes) -> None:
    # An overlay written without -F: QEMU would probe the backing file's format; hostguard must see None.
    data = patched(overlay, ">I", 112, 0x0BADF00D)  # turn the backing-format extension into an unknown one
    h = header_from_bytes(data)
    assert (h.backing_file, h.backing_format) == ("plain.qcow2", None)


@pytest.mark.parametrize(
    ("payload", "match"), [(b"q" * 16, "too long"), (b"qc ow2", "not a format name"), (b"", "empty")]
)
def test_bad_backing_format_is_refused(v3: bytes, payload: bytes, match: str) -> None:
    refused(add_extensions(bytearray(v3), 112, [(EXT_BACKING_FORMAT, payload)]), match, 120)


def test_data_file_name_with_nul_is_refused(v3: bytes) -> None:
    data = add_extensions(bytearray(v3), 112, [(EXT_DATA_FILE, b"/img/d.raw\0/etc/shadow")])
    refused(data, "external data file name contains a NUL byte", 130)


def test_data_file_extension_alone_counts_as_external(v3: bytes) -> None:
    h = header_from_bytes(add_extensions(bytearray(v3), 112, [(EXT_DATA_FILE, b"/img/d.raw")]))
    assert h.data_file == "/img/d.raw" and h.external_data_file


def test_data_file_bit_alone_counts_as_external(v3: bytes) -> None:
    h = header_from_bytes(patched(v3, ">Q", 72, 4))
    assert h.data_file is None and h.external_data_file


# --- robustness -----------------------------------------------------------------------------------------------


def parse_or_format_error(data: bytes) -> None:
    try:
        header_from_bytes(data)
    except FormatError as err:
        assert "\n" not in str(err)


@pytest.mark.timeout(120)
@settings(max_examples=500, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_format_error(data: bytes) -> None:
    parse_or_format_error(data)


@pytest.mark.timeout(120)
@settings(max_examples=500, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([2, 3]), st.binary(max_size=4096))
def test_random_bytes_after_a_valid_magic_only_raise_format_error(version: int, rest: bytes) -> None:
    parse_or_format_error(b"QFI\xfb" + struct.pack(">I", version) + rest)


@pytest.fixture(scope="session")
def seeds(image: Callable[[str], Path]) -> list[bytes]:
    return [bytes(first_cluster(image(name))) for name in ("overlay-qcow2", "v2-overlay", "data-file", "plain")]


@pytest.mark.timeout(300)
@settings(max_examples=800, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_valid_headers_only_raise_format_error(seeds: list[bytes], data: st.DataObject) -> None:
    raw = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["byte", "u32", "u64", "truncate"]))
        pos = data.draw(st.integers(0, 255))  # the header, extensions and backing name live here
        if kind == "byte":
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "u32":
            struct.pack_into(">I", raw, pos, data.draw(st.integers(0, 2**32 - 1)))
        elif kind == "u64":
            struct.pack_into(">Q", raw, pos, data.draw(st.integers(0, 2**64 - 1)))
        else:
            del raw[data.draw(st.integers(0, len(raw))) :]
            break
    parse_or_format_error(bytes(raw))


def test_import_is_light() -> None:
    code = (
        "import sys, hostguard.host.qcow2; print(sorted(m for m in ('lxml', 'dissect', 'libvirt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
