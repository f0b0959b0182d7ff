"""The DomainRecord: what the hook verified for one domain start, written at `prepare` and read by the daemon and
the CLI after the start. Pure: typed values and their JSON form (bytes in, bytes out).

The JSON carries `"schema": SCHEMA`. Records written before the schema existed (no `schema` key, the same
fields) are read as schema 1: a host upgraded while guests run keeps checking them. Schema 2 adds `host_made`
(the files of disks a stack profile allowed unsigned, by identity: the block-graph stage must know them); a
schema 1 record reads with `host_made = None`, "not known", which is not "none". A record of a newer schema,
or one that is malformed, is refused with one line (`FormatError`): the caller treats that as "no usable
record", never as a pass. docs/adr/0013-domain-record.md has the format and its rules.
"""

from __future__ import annotations

import json

from hostguard.errors import FormatError
from hostguard.record import Record

SCHEMA = 2
READABLE_SCHEMAS = (1, 2)
MAX_RECORD_BYTES = 4 * 1024 * 1024
ROLES = ("overlay", "signed")


class RecordedFile(Record):
    """A file the hook verified, by the identity QEMU will open (device and inode), not only by path."""

    path: str
    dev: int
    ino: int


class RecordedLayer(Record):
    path: str
    format: str
    dev: int
    ino: int
    role: str  # "overlay" (unsigned, writable) or "signed" (the verified base)


class RecordedDisk(Record):
    target: str
    envelope: str
    layers: tuple[RecordedLayer, ...]  # top first; the last one is the signed base

    def signed_layer(self) -> RecordedLayer:
        return self.layers[-1]


class RecordedHostMade(Record):
    """A file of a disk the stack profile let through unsigned because its bytes showed what the stack makes
    (docs/adr/0016-stack-profiles.md), by identity: the post-start block-graph stage accepts exactly this file."""

    target: str
    kind: str  # what it was allowed as, e.g. "Nova config drive"
    path: str
    dev: int
    ino: int


class RecordedImage(Record):
    envelope: str
    image: str
    version: int
    signers: tuple[str, ...]


class DomainRecord(Record):
    name: str
    uuid: str
    images: tuple[RecordedImage, ...] = ()
    disks: tuple[RecordedDisk, ...] = ()
    boot: tuple[RecordedFile, ...] = ()
    notes: tuple[str, ...] = ()
    # None: not known (a record of schema 1, written before host-made files were recorded); () : none
    host_made: tuple[RecordedHostMade, ...] | None = None

    def primary_envelope(self) -> str:
        """The envelope of the domain's first verified image (the one its boot files belong to)."""
        if not self.images:
            raise FormatError(f"domain {self.name!r} has no verified image on record")
        return self.images[0].envelope

    def to_json(self) -> bytes:
        doc: dict[str, object] = {
            "schema": SCHEMA,
            "name": self.name,
            "uuid": self.uuid,
            "images": [
                {"envelope": i.envelope, "image": i.image, "version": i.version, "signers": list(i.signers)}
                for i in self.images
            ],
            "notes": list(self.notes),
            "disks": [
                {
                    "target": d.target,
                    "envelope": d.envelope,
                    "layers": [
                        {"path": x.path, "format": x.format, "dev": x.dev, "ino": x.ino, "role": x.role}
                        for x in d.layers
                    ],
                }
                for d in self.disks
            ],
            "boot": [{"path": f.path, "dev": f.dev, "ino": f.ino} for f in self.boot],
        }
        if self.host_made is not None:
            doc["host_made"] = [
                {"target": h.target, "kind": h.kind, "path": h.path, "dev": h.dev, "ino": h.ino} for h in self.host_made
            ]
        return json.dumps(doc, indent=1).encode()


# --- reading: strict, every field typed ------------------------------------------------------------------------


def _str(doc: dict[str, object], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise FormatError(f"domain record: {key!r} must be a string")
    return value


def _int(doc: dict[str, object], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"domain record: {key!r} must be a non-negative integer")
    return value


def _objects(doc: dict[str, object], key: str) -> list[dict[str, object]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise FormatError(f"domain record: {key!r} must be a list of objects")
    return value


def _strings(doc: dict[str, object], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"domain record: {key!r} must be a list of strings")
    return tuple(value)


def _layer(doc: dict[str, object]) -> RecordedLayer:
    role = _str(doc, "role")
    if role not in ROLES:
        raise FormatError(f"domain record: layer role {role!r} is none of {', '.join(ROLES)}")
    return RecordedLayer(_str(doc, "path"), _str(doc, "format"), _int(doc, "dev"), _int(doc, "ino"), role)


def _disk(doc: dict[str, object]) -> RecordedDisk:
    layers = tuple(_layer(x) for x in _objects(doc, "layers"))
    roles = [x.role for x in layers]
    if not layers or roles[-1] != "signed" or any(r != "overlay" for r in roles[:-1]):
        raise FormatError(f"domain record: disk {doc.get('target')!r}: layers must be overlays over one signed base")
    return RecordedDisk(_str(doc, "target"), _str(doc, "envelope"), layers)


def parse_domain_record(data: bytes) -> DomainRecord:
    """The record in `data` (schema 2 or 1, or the unversioned records of earlier releases). FormatError
    otherwise."""
    if len(data) > MAX_RECORD_BYTES:
        raise FormatError(f"domain record is larger than {MAX_RECORD_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"domain record is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("domain record must be a JSON object")
    schema = doc.get("schema", 1)
    if schema not in READABLE_SCHEMAS or isinstance(schema, bool):
        readable = " or ".join(str(s) for s in READABLE_SCHEMAS)
        raise FormatError(f"domain record schema {schema!r} is not {readable}: written by another hostguard version")
    if schema < 2 and "host_made" in doc:
        raise FormatError("domain record: 'host_made' needs schema 2")
    images = tuple(
        RecordedImage(_str(i, "envelope"), _str(i, "image"), _int(i, "version"), _strings(i, "signers"))
        for i in _objects(doc, "images")
    )
    boot = tuple(RecordedFile(_str(f, "path"), _int(f, "dev"), _int(f, "ino")) for f in _objects(doc, "boot"))
    return DomainRecord(
        name=_str(doc, "name"),
        uuid=_str(doc, "uuid"),
        images=images,
        disks=tuple(_disk(d) for d in _objects(doc, "disks")),
        boot=boot,
        notes=_strings(doc, "notes"),
        host_made=None
        if "host_made" not in doc
        else tuple(
            RecordedHostMade(_str(h, "target"), _str(h, "kind"), _str(h, "path"), _int(h, "dev"), _int(h, "ino"))
            for h in _objects(doc, "host_made")
        ),
    )
