"""The inventory of a real Debian 12 root filesystem: exact against the host's view of the same tree, and
the same list from libguestfs. The synthetic trees cover every rule; this covers what producers sign."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostguard.imagefs.inventory import InventoryResult, inventory
from hostguard.imagefs.readers import open_reader
from hostguard.signed.manifest import FileEntry, parse_manifest
from tests.testbed.debian import DebianImage, debian_image
from tests.testbed.prereq import require, require_root, require_tool
from tests.unit.inventory_images import expected_components

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def debian() -> DebianImage:
    require_root()
    require(shutil.which("debootstrap") is not None, "debootstrap is not installed (scripts/setup.sh installs it)")
    require_tool("getcap")
    return debian_image()


@pytest.fixture(scope="module")
def fast(debian: DebianImage) -> InventoryResult:
    with open_reader([(debian.qcow2, "qcow2")], "fast") as reader:
        return inventory(reader)


def by_path(result: InventoryResult) -> dict[str, FileEntry]:
    return {f.path: f for f in result.files}


def test_fast_reader_lists_exactly_what_the_host_sees_in_the_tree(debian: DebianImage, fast: InventoryResult) -> None:
    got = by_path(fast)
    want = expected_components(debian.tree)
    assert sorted(set(got) ^ set(want)) == []
    assert [p for p in want if got[p] != want[p]] == []
    assert len(got) > 500 and fast.layout == {"disk0": "/"}


def test_real_setuid_helpers_and_a_maintainer_script_capability(fast: InventoryResult) -> None:
    files = by_path(fast)
    for helper in ("/usr/bin/su", "/usr/bin/passwd", "/usr/bin/mount"):
        assert files[helper].mode == 0o4755 and files[helper].uid == 0, helper
    assert files["/usr/bin/ping"].capabilities == "cap_net_raw=ep"
    # Many shared objects carry no x bit (glibc's gconv modules, 0644): listed for their ELF header.
    gconv = [f for p, f in files.items() if p.startswith("/usr/lib/x86_64-linux-gnu/gconv/") and p.endswith(".so")]
    assert len(gconv) > 50 and all(f.mode == 0o644 for f in gconv)


def test_guestfs_reader_agrees_on_a_real_distribution(debian: DebianImage, fast: InventoryResult) -> None:
    require(importlib.util.find_spec("guestfs") is not None, "python3-guestfs is not importable")
    require_tool("qemu-system-x86_64")
    with open_reader([(debian.qcow2, "qcow2")], "guestfs") as reader:
        reference = inventory(reader)
    assert reference.files == fast.files


def test_manifest_create_binds_the_image_file_digest(
    debian: DebianImage, fast: InventoryResult, tmp_path: Path
) -> None:
    out = tmp_path / "debian.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hostguard.cli", "manifest", "create", str(debian.qcow2), "--name", "debian",
         "--version", "1", "--json", "-o", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] == len(fast.files)
    manifest = parse_manifest(out.read_bytes())
    assert manifest.files == fast.files
    h = hashlib.sha256()
    with debian.qcow2.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    assert [(d.sha256, d.size, d.format) for d in manifest.disks] == [
        (h.hexdigest(), debian.qcow2.stat().st_size, "qcow2")
    ]
