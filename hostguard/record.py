"""`Record`: the one base for hostguard's value classes. Fields are declared once, as annotations:

    class Layer(Record):
        path: str
        format: str = "raw"
        tags: tuple[str, ...] = field(default_factory=tuple)

A record is immutable (`class Ctx(Record, frozen=False)` for the few that stages fill in as they go), compares
and hashes by its fields, and has a repr. Type checkers see it as a dataclass (`typing.dataclass_transform`).

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


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: object) -> None:
        self.make = make


def field(*, default: Any = _MISSING, default_factory: Any = _MISSING) -> Any:
    """A field's default: `default_factory` is called for each new record (mutable defaults)."""
    if default_factory is not _MISSING:
        return _Factory(default_factory)
    return default


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class Record:
    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}
    _frozen: ClassVar[bool] = True

    def __init_subclass__(cls, *, frozen: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = list(cls._fields)
        defaults = dict(cls._defaults)
        # not inspect.get_annotations: `inspect` costs ~7 ms to import
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            if name not in fields:
                fields.append(name)
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
            elif defaults and name not in defaults:
                raise TypeError(f"{cls.__name__}.{name}: a field without a default follows one with a default")
        cls._fields = tuple(fields)
        cls._defaults = defaults
        cls._frozen = frozen
        if not frozen:
            cls.__hash__ = None  # type: ignore[assignment]  # mutable records are not hashable, as dataclasses

    def __init__(self, *args: object, **kwargs: object) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields, got {len(args)}")
        values = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names:
                raise TypeError(f"{type(self).__name__} has no field {name!r}")
            if name in values:
                raise TypeError(f"{type(self).__name__} got field {name!r} twice")
            values[name] = value
        for name in names:
            if name not in values:
                if name not in self._defaults:
                    raise TypeError(f"{type(self).__name__} needs field {name!r}")
                default = self._defaults[name]
                values[name] = default.make() if isinstance(default, _Factory) else default  # type: ignore[operator]
            object.__setattr__(self, name, values[name])

    def _init(self, **values: object) -> None:
        """For records that write their own `__init__` (a converter of their arguments)."""
        Record.__init__(self, **values)

    def __setattr__(self, name: str, value: object) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} fields cannot be deleted")

    def fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.fields()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
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
