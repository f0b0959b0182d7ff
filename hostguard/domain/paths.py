"""Host paths exactly as libvirt uses them: what is ambiguous, and policy globs that cannot be walked out of.

libvirt hands element text (`<kernel>`, `<loader>`, ...) and attribute values to QEMU verbatim: it strips
nothing and resolves no `.` or `..`. A check that normalises a path (Python's `str.strip()` also removes
U+00A0, U+0085, U+2028, newlines; `os.path.normpath` folds `..`) verifies a different file than QEMU opens.
So a path with leading or trailing whitespace, or with a control, format or line-separator character
anywhere, is refused as ambiguous; and a policy glob matches a path component by component, never across a
`/`, and never a path with an empty, `.` or `..` component (`/dev/vg0/*` must not admit `/dev/vg0/../sda`).

Pure and stdlib-only (the hook imports it on every start).
"""

from __future__ import annotations

import fnmatch
import re

# C0/C1 controls, DEL, soft hyphen, zero-width and bidirectional marks, line/paragraph separators, BOM and
# interlinear annotations: invisible in a log line, or splitting it, while still part of the name QEMU opens.
_INVISIBLE = "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"


def ambiguity(value: str) -> str | None:
    """Why `value` (a host path or a name as libvirt reads it) is ambiguous, or None."""
    if value[:1].isspace() or value[-1:].isspace():
        return "has leading or trailing whitespace (libvirt would use it verbatim)"
    if value.isascii() and value.isprintable():
        return None  # the common case, without compiling the pattern (a fresh process per hook run)
    m = re.search(_INVISIBLE, value)
    if m:
        return f"contains the invisible or control character U+{ord(m.group()):04X}"
    return None


def components_problem(path: str) -> str | None:
    """Why `path` cannot be matched lexically (not absolute; an empty, `.` or `..` component), or None."""
    if not path.startswith("/"):
        return "is not absolute"
    parts = path[1:].split("/")
    if parts == [""]:
        return None  # "/" itself
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        return "has an empty, '.' or '..' component"
    return None


def name_match(name: str, pattern: str) -> bool:
    """`fnmatch.fnmatchcase`, without compiling a regex for the common shapes ("x", "x*"): the hook runs
    once per start, so every compile is paid again each time."""
    prefix = pattern.endswith("*")
    head = pattern[:-1] if prefix else pattern
    if any(c in head for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name.startswith(head) if prefix else name == head


def glob_match(path: str, pattern: str) -> bool:
    """Whether `pattern` (an absolute fnmatch glob, checked by `glob_problem`) matches `path` component by
    component: `*`, `?` and `[...]` never match a `/`, and a path with `.`/`..`/empty components never matches."""
    if components_problem(path) is not None:
        return False
    have, want = path.rstrip("/").split("/"), pattern.rstrip("/").split("/")
    return len(have) == len(want) and all(name_match(h, w) for h, w in zip(have, want, strict=True))


def under_dir(path: str, directory: str) -> bool:
    """Whether `path`, read lexically (no `.`/`..`/empty components), lies strictly inside `directory`."""
    if components_problem(path) is not None or components_problem(directory) is not None:
        return False
    base = directory.rstrip("/")
    return path.startswith(base + "/") and len(path) > len(base) + 1


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` is not a usable path glob (config validation), or None."""
    return components_problem(pattern) or ambiguity(pattern)
