"""A bounded reader of the kernel's BTF (BPF Type Format): struct sizes and member offsets by name.

drgn 0.3 has no BTF type finder, and hostguard needs only the layout of a handful of kernel structures
(task_struct, mm_struct, file, dentry, inode, super_block, mount, module). This module parses the `.BTF`
blob (from the manifest-listed kernel file, or from guest memory as a fallback) and answers
`offsetof("task_struct", "tasks")`, `sizeof("qstr")`, ... Anonymous struct/union members are searched
through, as C does. The blob may be hostile (guest memory): every count, offset and string is bounded, and
any inconsistency is a `FormatError`.

Format: include/uapi/linux/btf.h (header, then `btf_type` records with kind-specific trailers, then a
string section).
"""

from __future__ import annotations

import struct

from hostguard.errors import FormatError
from hostguard.record import Record

BTF_MAGIC = 0xEB9F
MAX_BTF_BYTES = 64 << 20
MAX_TYPES = 1 << 20
MAX_DEPTH = 16  # typedef/qualifier chains and anonymous member nesting

# kinds
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")


class BtfType(Record):
    kind: int
    name: str
    size_or_type: int  # size for INT/STRUCT/UNION/ENUM/DATASEC/FLOAT, target type id for the others
    kind_flag: bool
    members: tuple[tuple[str, int, int], ...] = ()  # STRUCT/UNION: (name, type id, bit offset)
    array: tuple[int, int] | None = None  # ARRAY: (element type id, number of elements)


class Member(Record):
    """A resolved struct member: byte offset from the start of the outermost struct, byte size, and the
    member's type after typedefs and qualifiers."""

    offset: int
    size: int
    type_id: int


class Btf:
    """Parsed BTF. Construction validates the whole blob; lookups afterwards are dictionary reads."""

    def __init__(self, data: bytes) -> None:
        self.types: list[BtfType | None] = [None]  # id 0 is void
        self._by_name: dict[tuple[int, str], list[int]] = {}
        self._parse(data)

    # --- parsing -------------------------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise FormatError("BTF: shorter than its header")
        if len(data) > MAX_BTF_BYTES:
            raise FormatError(f"BTF: {len(data)} bytes exceed the {MAX_BTF_BYTES} byte limit")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise FormatError("BTF: bad magic (not little-endian BTF)")
        if version != 1:
            raise FormatError(f"BTF: unsupported version {version}")
        if hdr_len < _HEADER.size or hdr_len > len(data):
            raise FormatError("BTF: bad header length")
        body = memoryview(data)[hdr_len:]
        if type_off + type_len > len(body) or str_off + str_len > len(body) or type_len % 4:
            raise FormatError("BTF: type or string section outside the blob")
        self._strings = bytes(body[str_off : str_off + str_len])
        if str_len and self._strings[-1] != 0:
            raise FormatError("BTF: string section is not NUL-terminated")
        types = body[type_off : type_off + type_len]
        pos = 0
        while pos < len(types):
            if len(self.types) > MAX_TYPES:
                raise FormatError(f"BTF: more than {MAX_TYPES} types")
            if pos + _TYPE.size > len(types):
                raise FormatError("BTF: truncated type record")
            name_off, info, size_or_type = _TYPE.unpack_from(types, pos)
            pos += _TYPE.size
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = bool(info >> 31)
            name = self._string(name_off)
            members: tuple[tuple[str, int, int], ...] = ()
            array = None
            extra = 0
            if kind in (INT, VAR, DECL_TAG):
                extra = 4
            elif kind == ARRAY:
                extra = 12
                if pos + 12 > len(types):
                    raise FormatError("BTF: truncated array record")
                elem, _index, nelems = struct.unpack_from("<III", types, pos)
                array = (elem, nelems)
            elif kind in (STRUCT, UNION):
                extra = 12 * vlen
                if pos + extra > len(types):
                    raise FormatError("BTF: truncated struct record")
                out = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", types, pos + 12 * i)
                    bit_offset = m_off & 0xFFFFFF if kflag else m_off
                    out.append((self._string(m_name), m_type, bit_offset))
                members = tuple(out)
            elif kind in (ENUM, FUNC_PROTO):
                extra = 8 * vlen
            elif kind in (DATASEC, ENUM64):
                extra = 12 * vlen
            elif kind in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
                extra = 0
            else:
                raise FormatError(f"BTF: unknown type kind {kind}")
            if pos + extra > len(types):
                raise FormatError("BTF: truncated type record")
            pos += extra
            type_id = len(self.types)
            self.types.append(BtfType(kind, name, size_or_type, kflag, members, array))
            if name:
                self._by_name.setdefault((kind, name), []).append(type_id)
        for t in self.types[1:]:
            assert t is not None
            refs = [m[1] for m in t.members]
            if t.kind not in (INT, STRUCT, UNION, ENUM, ENUM64, FWD, FLOAT, DATASEC):
                refs.append(t.size_or_type)
            if t.array is not None:
                refs.append(t.array[0])
            if any(r >= len(self.types) for r in refs):
                raise FormatError("BTF: a type refers to a type id that does not exist")

    def _string(self, offset: int) -> str:
        if offset == 0:
            return ""
        if offset >= len(self._strings):
            raise FormatError("BTF: string offset outside the string section")
        end = self._strings.find(b"\0", offset, offset + 1024)
        if end < 0:
            raise FormatError("BTF: unterminated or over-long name")
        return self._strings[offset:end].decode("ascii", "replace")

    # --- lookups -------------------------------------------------------------------------------------------

    def _type(self, type_id: int) -> BtfType:
        t = self.types[type_id] if 0 < type_id < len(self.types) else None
        if t is None:
            raise FormatError(f"BTF: no type {type_id}")
        return t

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(MAX_DEPTH):
            if type_id == 0:
                return 0
            t = self._type(type_id)
            if t.kind not in _QUALIFIERS:
                return type_id
            type_id = t.size_or_type
        raise FormatError("BTF: typedef/qualifier chain too long")

    def struct_id(self, name: str) -> int:
        """The complete struct (or union) called `name`."""
        for kind in (STRUCT, UNION):
            for type_id in self._by_name.get((kind, name), ()):
                t = self._type(type_id)
                if t.members or t.size_or_type:
                    return type_id
        raise FormatError(f"BTF: no struct {name}")

    def sizeof_id(self, type_id: int, depth: int = 0) -> int:
        if depth > MAX_DEPTH:
            raise FormatError("BTF: array types nested too deeply")
        type_id = self.resolve(type_id)
        t = self._type(type_id)
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY and t.array is not None:
            return t.array[1] * self.sizeof_id(t.array[0], depth + 1)
        raise FormatError(f"BTF: type {type_id} ({t.name or 'anonymous'}) has no size")

    def sizeof(self, struct_name: str) -> int:
        return self.sizeof_id(self.struct_id(struct_name))

    def member(self, struct_name: str, path: str) -> Member:
        """`path` is "a" or "a.b.c" (members of nested structs, by value). Anonymous members are looked
        through, as C does."""
        type_id = self.struct_id(struct_name)
        offset = 0
        for part in path.split("."):
            found = self._find_member(type_id, part, 0)
            if found is None:
                raise FormatError(f"BTF: struct {struct_name} has no member {path}")
            bit_offset, member_type = found
            if bit_offset % 8:
                raise FormatError(f"BTF: {struct_name}.{path} is a bit field")
            offset += bit_offset // 8
            type_id = self.resolve(member_type)
        return Member(offset, self.sizeof_id(type_id), type_id)

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.member(struct_name, path).offset

    def _find_member(self, type_id: int, name: str, depth: int) -> tuple[int, int] | None:
        if depth > MAX_DEPTH:
            raise FormatError("BTF: anonymous members nested too deeply")
        t = self._type(self.resolve(type_id))
        if t.kind not in (STRUCT, UNION):
            return None
        for m_name, m_type, bit_offset in t.members:
            if m_name == name:
                return bit_offset, m_type
        for m_name, m_type, bit_offset in t.members:
            if not m_name:
                inner = self._find_member(m_type, name, depth + 1)
                if inner is not None:
                    return bit_offset + inner[0], inner[1]
        return None

    def array_length(self, member: Member) -> int:
        t = self._type(member.type_id)
        if t.kind != ARRAY or t.array is None:
            raise FormatError("BTF: member is not an array")
        return t.array[1]
