"""`Record`: the one base for hostguard's value classes. Fields are declared once, as annotations:

    class Layer(Record):
        path: str
        format: str = "raw"
        tags: tuple[str, ...] = field(default_factory=tuple)

A record is immutable and slotted (`class Ctx(Record, frozen=False)` for the few that are filled in as they go:
those keep a `__dict__` and are not hashable), compares, orders and hashes by its fields, and has a repr. Each
class gets its own generated `__init__`, as dataclasses do. Type checkers see it as a dataclass
(`typing.dataclass_transform`).

Why not `dataclasses`: it costs ~9 ms to import plus ~0.5 ms per class, and `typing` ~3 ms: together more than
the whole budget of a cached re-verification or a warm hook run. This base imports nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_options):  # a no-op at run time; mypy reads the real one
        return lambda cls: cls


_MISSING = object()


class _Field:
    """A field's options, as `field()` gives them."""

    __slots__ = ("compare", "default", "make", "repr")

    def __init__(self, default: object, make: object, compare: bool, repr: bool) -> None:
        self.default, self.make, self.compare, self.repr = default, make, compare, repr


def field(
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    compare: bool = True,
    hash: bool | None = None,
    repr: bool = True,
) -> Any:
    """A field's default and options: `default_factory` is called for each new record (mutable defaults);
    `compare=False` (or `hash=False`) leaves the field out of equality, ordering and hashing; `repr=False` out of
    the repr."""
    return _Field(default, default_factory, compare and hash is not False, repr)


def _make_init(cls: type, fields: tuple[str, ...], options: dict[str, _Field]) -> Any:
    """An `__init__` written for this class, as dataclasses do: plain parameters, one store per field."""
    params, body, env = ["self"], [], {"_set": object.__setattr__, "_MISSING": _MISSING}
    for name in fields:
        option = options.get(name)
        if option is None or (option.default is _MISSING and option.make is _MISSING):
            params.append(name)
            body.append(f"_set(self, {name!r}, {name})")
        elif option.make is not _MISSING:
            env[f"_make_{name}"] = option.make
            params.append(f"{name}=_MISSING")
            body.append(f"_set(self, {name!r}, _make_{name}() if {name} is _MISSING else {name})")
        else:
            env[f"_default_{name}"] = option.default
            params.append(f"{name}=_default_{name}")
            body.append(f"_set(self, {name!r}, {name})")
    source = f"def __init__({', '.join(params)}):\n    " + "\n    ".join(body or ["pass"])
    exec(source, env)  # noqa: S102 - our own generated source, from field names that Python already accepted
    init: Any = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


class _RecordMeta(type):
    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], *, frozen: bool = True) -> Any:
        fields: list[str] = []
        options: dict[str, _Field] = {}
        for base in bases:
            fields += [f for f in getattr(base, "_fields", ()) if f not in fields]
            options.update(getattr(base, "_options", {}))
        own = []
        for field_name, annotation in ns.get("__annotations__", {}).items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            if field_name in ns:
                value = ns.pop(field_name)
                options[field_name] = value if isinstance(value, _Field) else _Field(value, _MISSING, True, True)
            elif field_name not in fields and any(
                o.default is not _MISSING or o.make is not _MISSING for o in options.values()
            ):
                raise TypeError(f"{name}.{field_name}: a field without a default follows one with a default")
            if field_name not in fields:
                fields.append(field_name)
                own.append(field_name)
        if frozen and "__slots__" not in ns:
            ns["__slots__"] = tuple(own)  # like slots=True: compact and fast; mutable records keep a __dict__
        ns["_fields"], ns["_options"], ns["_frozen"] = tuple(fields), options, frozen
        if not frozen:
            ns["__hash__"] = None  # mutable records are not hashable, as dataclasses
        cls = super().__new__(mcls, name, bases, ns)
        if "__init__" not in ns and fields:
            setattr(cls, "__init__", _make_init(cls, tuple(fields), options))  # noqa: B010 - a generated method
        compared = [f for f in fields if f not in options or options[f].compare]
        # the compared values in one expression, not a loop of getattr: equality, ordering and hashing use it
        getter = eval(f"lambda self: ({''.join(f'self.{f}, ' for f in compared)})")  # noqa: S307 - field names
        setattr(cls, "_values", getter)  # noqa: B010 - a generated method
        cls._shown = tuple(f for f in fields if f not in options or options[f].repr)  # type: ignore[attr-defined]
        return cls


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class Record(metaclass=_RecordMeta):
    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _options: ClassVar[dict[str, _Field]] = {}
    _frozen: ClassVar[bool] = True
    _shown: ClassVar[tuple[str, ...]] = ()

    def _init(self, **values: object) -> None:
        """For records that write their own `__init__` (a converter of their arguments)."""
        for name in self._fields:
            object.__setattr__(self, name, values.pop(name))
        if values:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(values))!r}")

    def __setattr__(self, name: str, value: object) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} fields cannot be deleted")

    def _values(self) -> tuple[object, ...]:
        return ()  # replaced per class by the metaclass

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __lt__(self, other: object) -> bool:
        # Records of one type order by their fields, in declaration order (dataclasses' order=True).
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() < other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"{type(self).__name__}({inner})"


# --- a plain-data codec, for caches that store records as JSON -------------------------------------------------


def to_plain(value: object) -> object:
    """Records, tuples and scalars as JSON-able data: a record is {"": class name, field: value, ...}."""
    if isinstance(value, Record):
        out: dict[str, object] = {"": type(value).__name__}
        for name in value._fields:
            out[name] = to_plain(getattr(value, name))
        return out
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def from_plain(doc: object, types: dict[str, type[Record]]) -> object:
    """Inverse of `to_plain` for records of `types` (lists become tuples). ValueError on anything else."""
    if isinstance(doc, dict):
        cls = types.get(str(doc.get("", "")))
        if cls is None or set(doc) != {"", *cls._fields}:
            raise ValueError("record of an unknown type or with other fields")
        return cls(**{name: from_plain(doc[name], types) for name in cls._fields})
    if isinstance(doc, list):
        return tuple(from_plain(v, types) for v in doc)
    if doc is None or isinstance(doc, str | int | float):
        return doc
    raise ValueError(f"cannot decode {type(doc).__name__}")


def as_dict(value: Record) -> dict[str, Any]:
    """The record's fields by name (shallow: field values are not copied or converted)."""
    return {name: getattr(value, name) for name in value._fields}
