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
