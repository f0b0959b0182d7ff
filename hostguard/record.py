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

from _operator import attrgetter  # the C module: `operator` itself costs an import

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar, dataclass_transform

    _R = TypeVar("_R", bound="Record")
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


_set = object.__setattr__


def _tuple_getter(names: list[str]) -> Any:
    """A C callable from a record to a tuple of these fields (not a descriptor: call it as `self._values(self)`)."""
    if len(names) >= 2:
        return attrgetter(*names)
    return attrgetter(*(names * 2 or ["__class__", "__class__"]))  # a tuple even for zero or one field


# A class made this often gets an `__init__` written for it, as dataclasses write theirs (~2x faster per record):
# compiling one costs ~0.1 ms, which the hook cannot pay for each of its classes, but a walk of 100,000 files can.
SPECIALIZE_AFTER = 64


def _specialize(cls: Any) -> None:
    params, body, env = ["self"], [], {"_set": _set, "_MISSING": _MISSING}
    for name, option in cls._plan:
        if option is None or (option.default is _MISSING and option.make is _MISSING):
            params.append(name)
        elif option.make is not _MISSING:
            env[f"_make_{name}"] = option.make
            params.append(f"{name}=_MISSING")
            body.append(f"if {name} is _MISSING: {name} = _make_{name}()")
        else:
            env[f"_default_{name}"] = option.default
            params.append(f"{name}=_default_{name}")
        body.append(f"_set(self, {name!r}, {name})")
    if getattr(cls, "__post_init__", None) is not None:
        body.append("self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n    " + "\n    ".join(body or ["pass"])
    exec(source, env)  # noqa: S102 - our own source, from field names that Python already accepted as names
    init: Any = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init


def _generic_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """Every record's `__init__` until its class is specialized (below)."""
    cls = type(self)
    if cls.__dict__.get("__init__") is _generic_init:  # not when a subclass's own __init__ called it (super())
        if cls.__dict__.get("_made", 0) >= SPECIALIZE_AFTER:
            _specialize(cls)
        else:
            setattr(cls, "_made", cls.__dict__.get("_made", 0) + 1)  # noqa: B010 - a per-class counter
    plan = self._plan
    if len(args) > len(plan):
        raise TypeError(f"{type(self).__name__}() takes {len(plan)} fields but {len(args)} were given")
    for i, (name, option) in enumerate(plan):
        if i < len(args):
            value = args[i]
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for field {name!r}")
        elif name in kwargs:
            value = kwargs.pop(name)
        elif option is None or (option.default is _MISSING and option.make is _MISSING):
            raise TypeError(f"{type(self).__name__}() is missing field {name!r}")
        elif option.make is not _MISSING:
            value = option.make()
        else:
            value = option.default
        _set(self, name, value)
    if kwargs:
        raise TypeError(f"{type(self).__name__}() got an unexpected field {next(iter(kwargs))!r}")
    post_init = getattr(cls, "__post_init__", None)
    if post_init is not None:
        post_init(self)  # as dataclasses do: derived state once every field is set


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
        compared = [f for f in fields if f not in options or options[f].compare]
        # Built from C callables, not generated source: compiling per class cost the hook ~2.5 ms in all.
        ns["_values"] = _tuple_getter(compared)
        ns["_shown"] = tuple(f for f in fields if f not in options or options[f].repr)
        ns["_plan"] = tuple((f, options.get(f)) for f in fields)
        # Each class starts with the generic __init__ (never a specialized one of its base: other fields).
        ns.setdefault("__init__", _generic_init)
        return super().__new__(mcls, name, bases, ns)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class Record(metaclass=_RecordMeta):
    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _options: ClassVar[dict[str, _Field]] = {}
    _frozen: ClassVar[bool] = True
    _shown: ClassVar[tuple[str, ...]] = ()
    _plan: ClassVar[tuple[tuple[str, _Field | None], ...]] = ()
    _values: ClassVar[Any]  # the compared fields as a tuple: `self._values(self)`

    __init__ = _generic_init  # typed for mypy by dataclass_transform

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

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return bool(self._values(self) == other._values(other))

    def __lt__(self, other: object) -> bool:
        # Records of one type order by their fields, in declaration order (dataclasses' order=True).
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return bool(self._values(self) < other._values(other))

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values(self)))

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


def replace(value: _R, **changes: Any) -> _R:
    """A copy of the record with some fields changed (dataclasses.replace)."""
    unknown = set(changes) - set(value._fields)
    if unknown:
        raise TypeError(f"{type(value).__name__} has no field {sorted(unknown)[0]!r}")
    copy: _R = type(value)(**{**as_dict(value), **changes})
    return copy
