"""The signed manifest: what an image is and which executable components it holds. Pure: bytes in, bytes out.

Format `hostguard.signed.manifest/v1` (stable; see docs/formats.md). Parsing is strict: unknown keys, wrong types
(a bool is not an int), non-canonical digests and duplicate keys are errors, so every verifier reads one
document the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from hostguard import strictjson
from hostguard.errors import FormatError
from hostguard.record import Record, field

SCHEMA = "hostguard.signed.manifest/v1"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_PATH_BYTES = 4096
DISK_FORMATS = ("raw", "qcow2")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


# --- paths ------------------------------------------------------------------------------------------------
# Guest file names are bytes. In the manifest they are text: UTF-8, except that "%" and every byte that is not
# part of a valid UTF-8 sequence are written as "%XX" (upper-case hex). Lossless and unambiguous: a literal
# "%" is always escaped, so "%XX" can only mean one byte.


def encode_path(raw: bytes) -> str:
    out: list[str] = []
    i = 0
    while i < len(raw):
        b = raw[i]
        if b == 0x25:  # "%"
            out.append("%25")
            i += 1
            continue
        if b < 0x80:
            out.append(chr(b))
            i += 1
            continue
        # Longest valid UTF-8 sequence starting here (1..4 bytes), else escape one byte.
        for length in (4, 3, 2):
            try:
                out.append(raw[i : i + length].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += length
            break
        else:
            out.append(f"%{b:02X}")
            i += 1
    return "".join(out)


_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def decode_path(text: str) -> bytes:
    """Inverse of `encode_path`. Only the canonical spelling is accepted, so one path has one text."""
    raw = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        raw += text[pos : m.start()].encode("utf-8", "surrogatepass")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode("utf-8", "surrogatepass")
    if encode_path(bytes(raw)) != text:
        raise FormatError(f"path {text[:80]!r} is not in canonical %XX encoding")
    return bytes(raw)


# --- entries ----------------------------------------------------------------------------------------------


class FileEntry(Record):
    """One executable component of the image. `path` uses the manifest path encoding above."""

    path: str
    sha256: str
    size: int
    mode: int  # st_mode & 0o7777
    uid: int
    gid: int
    capabilities: str | None = None

    @property
    def setuid(self) -> bool:
        return bool(self.mode & 0o4000)

    @property
    def setgid(self) -> bool:
        return bool(self.mode & 0o2000)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "capabilities": self.capabilities,
        }


class Blob(Record):
    """A file known by digest and size: a disk image, a kernel, an initrd."""

    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


class DiskEntry(Blob):
    format: str = "qcow2"
    # The guest-visible content (what `qemu-img convert -O raw` writes: the virtual disk's bytes), so a raw
    # conversion of the signed image verifies too (issue 15). Optional: older manifests have none.
    content: Blob | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size, "format": self.format}
        if self.content is not None:
            out["content"] = self.content.to_json()
        return out


class BootFiles(Record):
    kernel: Blob | None = None
    initrd: Blob | None = None
    # The kernel command line the producer signs (issue 14): the exact line, or the parameters (globs over a
    # whole parameter) a host may set. Optional and exclusive; without either the host's policy decides.
    cmdline: str | None = None
    cmdline_params: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kernel is not None:
            out["kernel"] = self.kernel.to_json()
        if self.initrd is not None:
            out["initrd"] = self.initrd.to_json()
        if self.cmdline is not None:
            out["cmdline"] = self.cmdline
        if self.cmdline_params is not None:
            out["cmdline_params"] = list(self.cmdline_params)
        return out


MAX_CMDLINE = 4096  # x86's COMMAND_LINE_SIZE since Linux 5.x; no kernel takes more


def cmdline_problem(text: str) -> str | None:
    """Why `text` is not a kernel command line hostguard can compare exactly, or None: printable ASCII, no
    quotes (the kernel unquotes, and treats byte 0xA0 as a space: a second parser would be the bug)."""
    if len(text) > MAX_CMDLINE:
        return f"is longer than {MAX_CMDLINE} characters"
    if any(not (" " <= c <= "~") for c in text) or '"' in text:
        return "contains quotes, tabs, newlines or non-ASCII characters"
    return None


def parse_boot(raw: object) -> BootFiles:
    b = _obj(raw, "boot", (), ("kernel", "initrd", "cmdline", "cmdline_params"))
    boot = BootFiles(
        kernel=_blob(b["kernel"], "boot.kernel") if "kernel" in b else None,
        initrd=_blob(b["initrd"], "boot.initrd") if "initrd" in b else None,
    )
    if "cmdline" not in b and "cmdline_params" not in b:
        return boot  # what every manifest before issue 14 says: the host's policy decides
    if "cmdline" in b and "cmdline_params" in b:
        raise FormatError("boot.cmdline and boot.cmdline_params exclude each other")
    if boot.kernel is None:
        raise FormatError("a signed kernel command line needs boot.kernel")
    if "cmdline" in b:
        line = b["cmdline"]
        if not isinstance(line, str):
            raise FormatError("boot.cmdline must be a string")
        why = cmdline_problem(line)
        if why is not None:
            raise FormatError(f"boot.cmdline {why}")
        return BootFiles(boot.kernel, boot.initrd, cmdline=line)
    params = _list(b["cmdline_params"], "boot.cmdline_params")
    for i, p in enumerate(params):
        if not isinstance(p, str) or not p or " " in p or cmdline_problem(p) is not None:
            raise FormatError(f"boot.cmdline_params[{i}] must be one kernel parameter (printable ASCII, no quotes)")
    return BootFiles(boot.kernel, boot.initrd, cmdline_params=tuple(params))


class ImageId(Record):
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class Manifest(Record):
    image: ImageId
    created: datetime
    expires: datetime
    disks: tuple[DiskEntry, ...]
    files: tuple[FileEntry, ...] = ()
    boot: BootFiles | None = None
    schema: str = field(default=SCHEMA)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.schema,
            "image": {"name": self.image.name, "version": self.image.version},
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "disks": [d.to_json() for d in self.disks],
            "files": [f.to_json() for f in sorted(self.files)],
        }
        if self.boot is not None:
            out["boot"] = self.boot.to_json()
        return out

    def to_bytes(self) -> bytes:
        """Deterministic bytes: the same manifest always serializes identically."""
        text = json.dumps(self.to_json(), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode("utf-8")

    def files_by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}


# --- time -------------------------------------------------------------------------------------------------


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object, what: str) -> datetime:
    if not isinstance(text, str) or not _RFC3339_UTC.fullmatch(text):
        raise FormatError(f"{what} must be an RFC 3339 UTC timestamp like 2026-01-31T12:00:00Z")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FormatError(f"{what} {text!r} is not a valid date") from None


# --- parsing ----------------------------------------------------------------------------------------------


def _obj(value: object, what: str, keys: Iterable[str], optional: Iterable[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be a JSON object")
    required = set(keys)
    allowed = required | set(optional)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise FormatError(f"{what} has unknown key {unknown[0]!r}")
    missing = sorted(required - set(value))
    if missing:
        raise FormatError(f"{what} lacks key {missing[0]!r}")
    return value


def _int(value: object, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    # bool is an int subclass in Python: type confusion that a strict verifier must refuse.
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _str(value: object, what: str, max_len: int = 4096) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise FormatError(f"{what} must be a non-empty string of at most {max_len} characters")
    return value


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise FormatError(f"{what} must be 64 lower-case hex digits")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise FormatError(f"{what} must be a JSON list")
    return value


def _blob(value: object, what: str) -> Blob:
    obj = _obj(value, what, ("sha256", "size"))
    return Blob(_digest(obj["sha256"], f"{what}.sha256"), _int(obj["size"], f"{what}.size"))


def parse_file_entry(value: object, what: str = "file entry") -> FileEntry:
    obj = _obj(value, what, ("path", "sha256", "size", "mode", "uid", "gid", "capabilities"))
    path = _str(obj["path"], f"{what}.path", MAX_PATH_BYTES)
    if not path.startswith("/"):
        raise FormatError(f"{what}.path {path[:80]!r} must be absolute")
    decode_path(path)  # validates escapes
    caps = obj["capabilities"]
    if caps is not None:
        caps = _str(caps, f"{what}.capabilities", 1024)
    return FileEntry(
        path=path,
        sha256=_digest(obj["sha256"], f"{what}.sha256"),
        size=_int(obj["size"], f"{what}.size"),
        mode=_int(obj["mode"], f"{what}.mode", 0, 0o7777),
        uid=_int(obj["uid"], f"{what}.uid", 0, 2**32 - 1),
        gid=_int(obj["gid"], f"{what}.gid", 0, 2**32 - 1),
        capabilities=caps,
    )


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes (already signature-checked by the caller)."""
    doc = strictjson.loads(data, what="manifest", max_size=MAX_MANIFEST_BYTES)
    obj = _obj(doc, "manifest", ("schema", "image", "created", "expires", "disks", "files"), ("boot",))
    if obj["schema"] != SCHEMA:
        raise FormatError(f"manifest schema {obj['schema']!r} is not {SCHEMA!r}")
    image = _obj(obj["image"], "manifest image", ("name", "version"))
    image_id = ImageId(_str(image["name"], "image.name", 256), _int(image["version"], "image.version", 1))

    disks: list[DiskEntry] = []
    for i, raw in enumerate(_list(obj["disks"], "disks")):
        d = _obj(raw, f"disks[{i}]", ("sha256", "size", "format"), ("content",))
        fmt = d["format"]
        if fmt not in DISK_FORMATS:
            raise FormatError(f"disks[{i}].format must be one of {', '.join(DISK_FORMATS)}")
        disk = DiskEntry(_digest(d["sha256"], f"disks[{i}].sha256"), _int(d["size"], f"disks[{i}].size"), fmt)
        if "content" in d:
            content = _blob(d["content"], f"disks[{i}].content")
            # A raw file is its own content: a manifest saying otherwise contradicts itself.
            if fmt == "raw" and content != Blob(disk.sha256, disk.size):
                raise FormatError(f"disks[{i}].content of a raw disk must equal its sha256 and size")
            disk = DiskEntry(disk.sha256, disk.size, fmt, content)
        disks.append(disk)
    if not disks:
        raise FormatError("manifest lists no disks")

    files = [parse_file_entry(raw, f"files[{i}]") for i, raw in enumerate(_list(obj["files"], "files"))]
    seen: set[str] = set()
    for entry in files:
        if entry.path in seen:
            raise FormatError(f"manifest lists path {entry.path[:80]!r} twice")
        seen.add(entry.path)

    boot = parse_boot(obj["boot"]) if "boot" in obj else None

    created = parse_time(obj["created"], "created")
    expires = parse_time(obj["expires"], "expires")
    if expires <= created:
        raise FormatError("manifest expires before it was created")
    return Manifest(
        image=image_id,
        created=created,
        expires=expires,
        disks=tuple(disks),
        files=tuple(sorted(files)),
        boot=boot,
    )
