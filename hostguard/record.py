"""`Record`: a base for small immutable value classes on the start-up path of `hostguard verify`.

`dataclasses` costs ~9 ms to import plus ~0.5 ms per class, and `typing` (for NamedTuple) ~3 ms: together
more than the whole budget of a cached re-verification. A Record subclass lists its fields in `__slots__`,
sets them in `__init__` through `_init`, and gets equality, hashing and a repr from them; assigning an
attribute afterwards raises.
"""

from __future__ import annotations


class Record:
    __slots__: tuple[str, ...] = ()

    def _init(self, **values: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values.pop(name))
        if values:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(values))!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.fields()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({inner})"


# --- a plain-data codec, for caches that store records as JSON -------------------------------------------------


def to_plain(value: object) -> object:
    """Records, tuples and scalars as JSON-able data: a record is {"": class name, field: value, ...}."""
    if isinstance(value, Record):
        out: dict[str, object] = {"": type(value).__name__}
        for name in value.__slots__:
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
        if cls is None or set(doc) != {"", *cls.__slots__}:
            raise ValueError("record of an unknown type or with other fields")
        return cls(**{name: from_plain(doc[name], types) for name in cls.__slots__})
    if isinstance(doc, list):
        return tuple(from_plain(v, types) for v in doc)
    if doc is None or isinstance(doc, str | int | float):
        return doc
    raise ValueError(f"cannot decode {type(doc).__name__}")
