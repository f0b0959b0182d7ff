"""hostguard.host.minitoml: whenever it answers, it answers exactly what tomllib answers; otherwise None."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostguard.host import minitoml
from hostguard.host.config import load_config

KEY = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
TEXT = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters='"\\\x7f'), max_size=12).filter(
    lambda s: not any(ord(c) < 32 for c in s)
)
STRING = TEXT.map(lambda s: f'"{s}"')
NUMBER = st.one_of(
    st.integers(-(10**17), 10**17).map(str),
    st.builds(lambda a, b: f"{a}.{b}", st.integers(-999, 999), st.integers(0, 999)),
)
ARRAY = st.lists(STRING, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
VALUE = st.one_of(STRING, NUMBER, ARRAY, st.sampled_from(["true", "false"]))
COMMENT = st.one_of(st.just(""), TEXT.map(lambda s: f"  # {s}"))


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.lists(KEY, min_size=1, max_size=2))
        lines.append(f"[{'.'.join(path)}]{draw(COMMENT)}")
        for _ in range(draw(st.integers(0, 4))):
            lines.append(f"{draw(KEY)} = {draw(VALUE)}{draw(COMMENT)}")
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "# note", "   "])))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


def agrees(text: str) -> None:
    ours = minitoml.loads(text)
    try:
        theirs = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert ours is None, f"minitoml accepted what tomllib refuses: {text!r}"
        return
    assert ours is None or ours == theirs, text


def _super_table_after_child(text: str) -> bool:
    """`[a.b]` before `[a]`: valid TOML that minitoml leaves to tomllib."""
    seen: list[str] = []
    for line in text.split("\n"):
        if line.startswith("["):
            path = line[1 : line.index("]")]
            if any(s.startswith(path + ".") for s in seen):
                return True
            seen.append(path)
    return False


@settings(max_examples=400, deadline=None)
@given(documents())
def test_generated_plain_documents_read_as_tomllib_reads_them(text: str) -> None:
    agrees(text)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    # The subset really is read (the test would be empty if minitoml declined everything).
    assert minitoml.loads(text) is not None or _super_table_after_child(text), text


@settings(max_examples=600, deadline=None)
@given(documents(), st.integers(0, 400), st.text(max_size=3))
def test_mutated_documents_are_read_as_tomllib_reads_them_or_left_to_it(text: str, at: int, insert: str) -> None:
    at = min(at, len(text))
    agrees(text[:at] + insert + text[at:])
    agrees(text[:at] + text[at + 1 :])


def test_a_typical_hostguard_toml_is_read_without_tomllib() -> None:
    text = """# hostguard host configuration
[trust]
dir = "/etc/hostguard/trust"

[state]
dir = "/var/lib/hostguard/state"   # rollback and caches

[policy]
mode = "enforce"
exempt = ["scratch-*", "ci-*",]
deadline_seconds = 20
allow_cdrom = false
check_interval_seconds = 600.5

[findings.action]
setuid_added = "pause"
"""
    assert minitoml.loads(text) == tomllib.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '[a]\nb = "x\\ny"\n',  # escapes
        "[a]\nb = 'literal'\n",  # literal string
        '[a]\nb = """multi"""\n',  # multi-line string
        "[a]\r\nb = 1\r\n",  # CRLF
        "[a]\nb = { c = 1 }\n",  # inline table
        "[a]\nb.c = 1\n",  # dotted key
        '[a]\n"b" = 1\n',  # quoted key
        "[a]\nb = 1979-05-27\n",  # date
        "[a]\nb = 1_000\n",  # underscores
        "[a]\nb = 1e3\n",  # exponent
        "[a]\nb = inf\n",
        "[a]\nb = 0x10\n",
        "b = 1\n[a]\n",  # a key before the first table
        "[a.b]\n[a]\n",  # super-table after its child: valid TOML, left to tomllib
        "[ a ]\n",  # spaces inside the brackets
        "[[a]]\n",  # array of tables
        '[a]\nb = [\n "x"\n]\n',  # multi-line array
        '[a]\nb = ["x", 1]\n',  # mixed array
        "[a]\nb = 1 2\n",
        "[a]\nb = \x01\n",
    ],
)
def test_anything_outside_the_subset_is_left_to_tomllib(text: str) -> None:
    assert minitoml.loads(text) is None


@pytest.mark.parametrize(
    "text",
    ["[a]\n[a]\n", "[a]\nb = 1\nb = 2\n", "[a]\nb = 1\n[a.b]\n", "[a]\nb = 01\n", "[a]\nb = [,]\n", "[a]\nb =\n"],
)
def test_documents_tomllib_refuses_are_never_accepted(text: str) -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(text)
    assert minitoml.loads(text) is None


def test_load_config_reads_both_paths_alike(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('[trust]\ndir = "/t"\n[policy]\nallow_filesystems = true\nfirmware_dirs = ["/fw"]\n')
    fancy = tmp_path / "fancy.toml"  # a literal string: only tomllib reads it
    fancy.write_text("[trust]\ndir = '/t'\n[policy]\nallow_filesystems = true\nfirmware_dirs = ['/fw']\n")
    assert minitoml.loads(fancy.read_text()) is None
    a, b = load_config(plain), load_config(fancy)
    assert (a.trust_dir, a.allow_filesystems, a.firmware_dirs) == (b.trust_dir, b.allow_filesystems, b.firmware_dirs)
    assert a.firmware_dirs == ("/fw",) and a.allow_filesystems is True
