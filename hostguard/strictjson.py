"""JSON parsing for signed and untrusted inputs.

Python's `json` keeps the last of duplicate keys, accepts NaN/Infinity and recurses without a bound; any of
these lets two verifiers disagree about one document, so all are errors here.
"""

from __future__ import annotations

import json
from typing import Any

from hostguard.errors import FormatError

MAX_DEPTH = 16


def _reject_constant(name: str) -> Any:
    raise FormatError(f"{name} is not allowed in JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise FormatError(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


# A JSON string (escapes included) or one bracket: what the depth scan looks at, at the regex engine's speed.
_STRING_OR_BRACKET = r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"|[][{}]'


def _check_depth(text: str, max_depth: int) -> None:
    # A linear pre-scan, so a deeply nested document fails with our message, not a RecursionError. Brackets
    # are counted outside strings only, as the parser sees them. Fast: the bound on the cost of an
    # unauthenticated envelope (issue 22/14) rests on it (a character loop took ~6 s for 92 MiB).
    import re

    depth = 0
    for match in re.finditer(_STRING_OR_BRACKET, text):
        ch = match.group()
        if ch in "[{":
            depth += 1
            if depth > max_depth:
                raise FormatError(f"JSON nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1


def loads(data: bytes, *, what: str, max_size: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON strictly. `what` names the document in error messages."""
    if len(data) > max_size:
        raise FormatError(f"{what} is {len(data)} bytes, over the {max_size}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8 (byte {exc.start})") from None
    if data.count(b"[") + data.count(b"{") > max_depth:  # else it cannot nest deeper (bytes.count: memchr speed)
        _check_depth(text, max_depth)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc.message}") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
