"""hostguard.record: the one value-class base (fields declared once; immutable unless asked; dataclass-like)."""

from __future__ import annotations

import pytest

from hostguard.record import Record, field, from_plain, to_plain


class Point(Record):
    x: int
    y: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


class Box(Record, frozen=False):
    items: list[int] = field(default_factory=list)


def test_fields_are_declared_once_and_filled_positionally_or_by_name() -> None:
    assert Point(1, 2) == Point(x=1, y=2) == Point(1, y=2)
    assert Point(3).y == 0 and Point(3).tags == ()
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=())"


def test_wrong_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="missing field 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected field 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for field 'x'"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 3 fields but 4 were given"):
        Point(1, 2, (), 4)  # type: ignore[call-arg]


def test_records_are_immutable_slotted_ordered_and_hash_by_value() -> None:
    p = Point(1, 2)
    with pytest.raises(AttributeError):
        p.x = 5  # type: ignore[misc]
    assert not hasattr(p, "__dict__")
    assert sorted([Point(2), Point(1, 5), Point(1, 3)]) == [Point(1, 3), Point(1, 5), Point(2)]
    assert hash(p) == hash(Point(1, 2)) and p != Point(2, 1)
    assert {p, Point(1, 2)} == {p}


def test_mutable_records_get_a_fresh_default_each_and_no_hash() -> None:
    a, b = Box(), Box()
    a.items.append(1)
    assert b.items == []
    a.items = [7]
    assert a == Box([7])
    with pytest.raises(TypeError):
        hash(a)


def test_a_field_without_default_after_one_with_default_is_refused() -> None:
    with pytest.raises(TypeError, match="without a default"):

        class Bad(Record):
            a: int = 1
            b: int  # type: ignore[misc]


def test_plain_codec_round_trips_and_refuses_unknown_shapes() -> None:
    p = Point(1, 2, ("a",))
    doc = to_plain(p)
    assert doc == {"": "Point", "x": 1, "y": 2, "tags": ["a"]}
    assert from_plain(doc, {"Point": Point}) == p
    with pytest.raises(ValueError, match="unknown type"):
        from_plain({"": "Point", "x": 1}, {"Point": Point})


def test_a_class_made_often_gets_its_own_init_and_keeps_its_meaning() -> None:
    class Hot(Record):
        a: int
        b: list[int] = field(default_factory=list)

    class Hotter(Hot):
        c: str = "c"

    made = [Hot(i) for i in range(200)] + [Hot(a=1, b=[2])]
    assert Hot.__init__ is not Record.__init__  # specialized
    assert made[150] == Hot(150) and made[150].b == [] and made[150].b is not made[151].b
    assert made[-1] == Hot(1, [2])
    assert Hotter(1).c == "c" and Hotter(1, [], "d").c == "d"  # a subclass never inherits a specialized __init__
    with pytest.raises(TypeError):
        Hot()  # type: ignore[call-arg]


def test_a_subclass_with_its_own_init_keeps_it_however_often_it_is_made() -> None:
    """Its __init__ calls the generic one through super(): that must never replace the subclass's own."""
    calls: list[int] = []

    class Base(Record):
        a: int

    class Own(Base):
        def __init__(self, a: int) -> None:
            super().__init__(a)
            calls.append(a)

    own_init = Own.__init__
    made = [Own(i) for i in range(200)]  # past the specialization threshold
    assert Own.__init__ is own_init and calls == list(range(200)) and made[150] == Own(150)


def test_post_init_runs_after_every_field_is_set_in_both_inits() -> None:
    class Counted(Record, frozen=False):
        a: int
        doubled: int = 0

        def __post_init__(self) -> None:
            self.doubled = self.a * 2

    made = [Counted(i) for i in range(100)]  # past the specialization threshold
    assert Counted.__init__ is not Record.__init__
    assert [c.doubled for c in made[:2]] == [0, 2] and made[99].doubled == 198
