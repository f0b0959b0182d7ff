"""A strict reader for the plain subset of TOML that a hostguard.toml is written in — or None.

`tomllib` costs ~5 ms to import (it compiles its regular expressions and imports typing), a quarter of a
hook run's budget; this reader uses no regular expressions at all. It accepts only documents made of:

    # comments and blank lines
    [table]  or  [table.sub]       (bare keys; each table header once, never after a key of that name)
    key = "basic string"           (no backslash, no control characters)
    key = true | false
    key = 42 | -7 | 0.5            (decimal, no underscores, no exponent, at most 18 digits)
    key = ["a", "b"]               (one line, strings only; a trailing comma is allowed)

each optionally followed by a comment, lines separated by LF. For such a document the result equals
`tomllib.loads(text)`; for anything else — CRLF, escapes, literal or multi-line strings, inline tables, dotted
keys, dates, a key before the first table, a repeated key or table, a control character anywhere — it returns
None and the caller uses `tomllib`, which then accepts or refuses the document with its own message. The
unit tests check the equality on generated documents and mutations of them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from typing import Any

_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
_MAX_DIGITS = 18  # stays inside TOML's 64-bit integers


def _is_key(text: str) -> bool:
    return bool(text) and all(c in _KEY_CHARS for c in text)


def _only_comment(rest: str) -> bool:
    """What may follow a value or a table header: whitespace and an optional comment."""
    rest = rest.lstrip(" \t")
    return not rest or rest.startswith("#")


def _string(text: str, start: int) -> tuple[str, int] | None:
    """The basic string whose opening quote is text[start]: (content, index after the closing quote)."""
    end = text.find('"', start + 1)
    if end < 0:
        return None
    content = text[start + 1 : end]
    if "\\" in content or "\t" in content:
        return None  # escapes (and tabs) are left to tomllib
    return content, end + 1


def _digits(text: str) -> bool:
    return 0 < len(text) <= _MAX_DIGITS and all(c in _DIGITS for c in text)


def _number(word: str) -> int | float | None:
    body = word[1:] if word[:1] in ("+", "-") else word
    whole, dot, fraction = body.partition(".")
    if not _digits(whole) or (len(whole) > 1 and whole[0] == "0"):
        return None
    if not dot:
        return int(word)
    return float(word) if _digits(fraction) else None


def _array(text: str) -> tuple[list[str], str] | None:
    """A one-line array of basic strings starting at text[0] == "[": (items, the rest of the line)."""
    items: list[str] = []
    i = 1
    while True:
        while text[i : i + 1] in (" ", "\t"):
            i += 1
        if text[i : i + 1] == "]":
            return items, text[i + 1 :]
        if text[i : i + 1] != '"':
            return None
        parsed = _string(text, i)
        if parsed is None:
            return None
        items.append(parsed[0])
        i = parsed[1]
        while text[i : i + 1] in (" ", "\t"):
            i += 1
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] != "]":
            return None


def _value(text: str) -> tuple[object, str] | None:
    """The value at the start of `text` and the rest of the line, or None."""
    if text.startswith('"'):
        parsed = _string(text, 0)
        return None if parsed is None else (parsed[0], text[parsed[1] :])
    if text.startswith("["):
        return _array(text)
    end = len(text)
    for stop in (" ", "\t", "#"):
        found = text.find(stop)
        if found != -1:
            end = min(end, found)
    word, rest = text[:end], text[end:]
    if word in ("true", "false"):
        return word == "true", rest
    number = _number(word)
    return None if number is None else (number, rest)


def loads(text: str) -> dict[str, Any] | None:
    """The document as tomllib would read it, or None when it is not in the plain subset."""
    if any((c < " " and c not in "\t\n") or c == "\x7f" for c in text):
        return None  # control characters (CR included): tomllib decides
    doc: dict[str, Any] = {}
    table: dict[str, Any] | None = None
    for raw in text.split("\n"):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            close = line.find("]")
            path = line[1:close].split(".") if close > 0 else []
            if not path or not all(_is_key(p) for p in path) or not _only_comment(line[close + 1 :]):
                return None
            *parents, last = path
            node = doc
            for part in parents:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    return None
                node = child
            if last in node:
                return None  # repeated, or defined implicitly before: leave the rules to tomllib
            table = node[last] = {}
            continue
        key, equals, rest = line.partition("=")
        key = key.rstrip(" \t")
        if not equals or table is None or not _is_key(key) or key in table:
            return None
        parsed = _value(rest.lstrip(" \t"))
        if parsed is None or not _only_comment(parsed[1]):
            return None
        table[key] = parsed[0]
    return doc
