"""A trust store swapped atomically (a symlink re-aimed at the new version) while the hook reads it: the read
is whole, old or new, never the old roots with the new CRLs (issue 20, item 4)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hostguard.host import trustdir
from hostguard.host.trustdir import read_trust_dir
from tests.testbed.pki import TestPKI, issue


def test_trust_store_swapped_in_the_middle_of_a_read_is_read_as_one_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = TestPKI()
    v1 = pki.write_trust_dir(tmp_path / "v1", crls=[pki.crl()])
    v2 = pki.write_trust_dir(tmp_path / "v2", crls=[pki.crl([pki.leaf.cert])])  # revokes the signer
    (v2 / "roots" / "root2.pem").write_bytes(issue("hostguard new root", ca=True, path_length=1).pem)
    link = tmp_path / "trust"
    link.symlink_to(v1)
    versions = {read_trust_dir(link).fingerprint: "v1"}
    link.unlink()
    link.symlink_to(v2)
    versions[read_trust_dir(link).fingerprint] = "v2"
    link.unlink()
    link.symlink_to(v1)

    check = trustdir._check_not_writable_by_others
    swapped: list[Path] = []

    def swap_after_the_first_root(path: Path, st: Any) -> None:
        check(path, st)
        if path.parent.name == "roots" and not swapped:  # the admin's atomic swap, between two files of a read
            (tmp_path / "trust.new").symlink_to(v2)
            os.replace(tmp_path / "trust.new", link)
            swapped.append(path)

    monkeypatch.setattr(trustdir, "_check_not_writable_by_others", swap_after_the_first_root)
    read = read_trust_dir(link)
    assert swapped
    assert versions.get(read.fingerprint) == "v1", [name for name, _ in read.files]
    monkeypatch.undo()
    assert versions.get(read_trust_dir(link).fingerprint) == "v2"  # the next read sees the new store
