"""`manifest diff` (pure diff, text and JSON, exit codes) and the inventory CLI glue (progress bar, summary)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hostguard.commands.inventory_output import ProgressBar, run_diff, run_inventory
from hostguard.errors import UsageError
from hostguard.imagefs.inventory import Progress
from hostguard.signed.manifest import DiskEntry, FileEntry, ImageId, Manifest
from hostguard.signed.manifestdiff import diff_manifests, render_text

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2027, 1, 1, tzinfo=UTC)
D = "a" * 64


def manifest(version: int, *files: FileEntry, disk: str = D) -> Manifest:
    return Manifest(ImageId("web", version), T0, T1, (DiskEntry(disk, 10, "qcow2"),), tuple(files))


def f(path: str, digest: str = D, mode: int = 0o755, caps: str | None = None, uid: int = 0) -> FileEntry:
    return FileEntry(path, digest, 5, mode, uid, 0, caps)


def test_diff_classifies_entries() -> None:
    old = manifest(1, f("/bin/same"), f("/bin/gone"), f("/bin/ping"), f("/bin/su", mode=0o755), f("/bin/x"))
    new = manifest(
        2,
        f("/bin/same"),
        f("/bin/new", caps="cap_net_raw=ep"),
        f("/bin/ping", caps="cap_net_raw=ep"),
        f("/bin/su", mode=0o4755),
        f("/bin/x", digest="b" * 64),
        disk="c" * 64,
    )
    d = diff_manifests(old, new)
    assert [e.path for e in d.added] == ["/bin/new"]
    assert [e.path for e in d.removed] == ["/bin/gone"]
    assert [(c.path, c.fields, c.privilege_widened) for c in d.changed] == [
        ("/bin/ping", ("capabilities",), True),
        ("/bin/su", ("mode",), True),
        ("/bin/x", ("sha256",), False),
    ]
    assert d.unchanged == 1
    assert [h[0] for h in d.header] == ["image", "disks"]
    text = render_text(d, "old.json", "new.json")
    assert "+!/bin/new" in text and "- /bin/gone" in text
    assert "~!/bin/su  mode 0755 -> 4755" in text
    assert "~ /bin/x  sha256 aaaaaaaaaaaaaaaa -> bbbbbbbbbbbbbbbb" in text
    assert "* image: web v1 -> web v2" in text
    assert text.rstrip().endswith("1 added, 1 removed, 3 changed, 1 unchanged; '!' marks wider privilege")
    doc = d.to_json()
    assert doc["changed"][1]["new"]["mode"] == 0o4755 and doc["unchanged"] == 1


def test_identical_manifests_diff_empty() -> None:
    m = manifest(1, f("/bin/a"))
    d = diff_manifests(m, m)
    assert d.empty and d.unchanged == 1


def test_run_diff_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(manifest(1, f("/bin/a")).to_bytes())
    b.write_bytes(manifest(1, f("/bin/a"), f("/bin/b")).to_bytes())
    assert run_diff(a, a) == 0
    assert "0 added, 0 removed, 0 changed, 1 unchanged" in capsys.readouterr().out
    assert run_diff(a, b, json_output=True) == 1
    assert [e["path"] for e in json.loads(capsys.readouterr().out)["added"]] == ["/bin/b"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UsageError, match=r"bad.json"):
        run_diff(a, bad)


def test_progress_bar_rendering() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.update(Progress(1, 0, 100, 0, walking=True, elapsed=0.1))
    assert out.getvalue() == ""  # short inventories draw nothing
    bar.update(Progress(10, 3, 4 << 20, 1 << 20, walking=True, elapsed=1.0))
    assert "scanning: 3/10+ files, 1.0/4.0+ MiB hashed" in out.getvalue()
    bar.update(Progress(10, 5, 4 << 20, 2 << 20, walking=False, elapsed=2.0))
    assert "[##############..............] 5/10 files  2.0/4.0 MiB  ETA 0:02" in out.getvalue()
    bar.finish()
    assert out.getvalue().endswith("\r\x1b[K")


def test_run_inventory_quiet_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit import inventory_images as imgs

    imgs.require_tools()
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/x").write_bytes(b"#!/bin/sh\n")
    (tree / "bin/x").chmod(0o755)
    image = imgs.make_ext(tree, tmp_path / "x.raw", size_mb=4)
    result = run_inventory([(image, "raw")], reader="fast", quiet=True)
    assert [e.path for e in result.files] == ["/bin/x"]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    run_inventory([(image, "raw")], reader="fast", json_summary=True)
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 1 and summary["reader"] == "fast" and summary["mounts"] == {"disk0": "/"}
    run_inventory([(image, "raw")], reader="fast")
    assert "inventory: 1 executable files on 1 filesystem(s)" in capsys.readouterr().err
