"""Is a path one that only root (or the user running hostguard) can change? For configuration, trust and state.

A trust directory that another user can write lets that user add a root; a state directory another user can
write lets it forge a verdict or digest row that root then honours. So each of them, every directory above it
and, for a symlink, its target and the directories above the target must be owned by root or by the effective
user, and writable by no group and no one else. One exception, as for /tmp: a root-owned directory with the
sticky bit, above (never at) the checked path, because nobody but root can replace what root created in it.

Light on purpose (os and stat only): the hook calls this on every start (~10 `lstat`s).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hostguard.errors import ConfigError


def _problem(st: os.stat_result, *, ancestor: bool) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        if ancestor and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            return None
        return "is writable by group or others"
    return None


def check_secure(path: Path, what: str, _depth: int = 0, _ancestor: bool = False) -> None:
    """Raise ConfigError (one line, naming the culprit) unless only root/us can change `path`, as above.

    A path that does not exist is not checked here (the caller reports it in its own words).
    """
    full = os.path.abspath(path)
    current, ancestor = full, _ancestor
    while True:  # strings, not pathlib: on the hook's path
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ConfigError(f"{what} {full}: cannot check {current}: {exc.strerror}") from None
        if st is not None and stat.S_ISLNK(st.st_mode):
            if _depth > 8:
                raise ConfigError(f"{what} {full}: too many levels of symbolic links")
            # The link itself cannot be re-aimed (its directory is checked next); what it points at must be safe too.
            check_secure(Path(os.path.realpath(current)), what, _depth + 1, ancestor)
        elif st is not None:
            problem = _problem(st, ancestor=ancestor)
            if problem is not None:
                at = f": {current}" if ancestor else ""
                raise ConfigError(
                    f"{what} {full}{at} {problem}: only root may be able to change it (chown root, chmod go-w)"
                )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current, ancestor = parent, True


def check_secure_file(st: os.stat_result, path: Path, what: str) -> None:
    """The check of one file already stat'ed (through symlinks) inside a checked directory."""
    problem = _problem(st, ancestor=False)
    if problem is not None:
        raise ConfigError(f"{what} {path} {problem}: only root may be able to change it (chown root, chmod go-w)")
