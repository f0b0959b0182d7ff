"""hostguard.host.securepath: who may change a configuration, trust or state path (issue 22/10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostguard.errors import ConfigError
from hostguard.host.securepath import check_secure

NOBODY = 65534


def test_a_root_owned_path_under_a_sticky_directory_is_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "state").mkdir(mode=0o700)
    check_secure(sticky / "state", "state directory")
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_secure(sticky, "state directory")  # the sticky directory itself is not


def test_a_symlinked_parent_is_checked_where_it_points(tmp_path: Path) -> None:
    users = tmp_path / "users"
    (users / "trust").mkdir(parents=True)
    link = tmp_path / "etc"
    link.symlink_to(users)
    check_secure(link / "trust", "trust directory")
    os.chown(users, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        check_secure(link / "trust", "trust directory")


def test_a_missing_path_is_left_to_the_caller(tmp_path: Path) -> None:
    check_secure(tmp_path / "not" / "there", "state directory")
