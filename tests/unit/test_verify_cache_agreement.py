"""The fast path of `hostguard verify` (plain argv without argparse, cached verdict without cryptography,
cached digests) gives the same answer as the full path (argparse, empty caches) in every case of the matrix:
the same exit code, the same message, the same JSON apart from the `cached` flags, the same rollback state."""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostguard.cli import build_parser, main
from hostguard.commands.verify_cmd import VerifyOptions, parse_simple_argv
from tests.testbed.pki import TestPKI


class Host:
    def __init__(self, tmp: Path, pki: TestPKI) -> None:
        self.tmp = tmp
        self.pki = pki
        self.trust = pki.write_trust_dir(tmp / "trust", crls=[pki.crl()])
        self.cert, self.key = pki.leaf.write(tmp / "keys", "leaf")
        self.chain = tmp / "keys" / "chain.pem"
        self.chain.write_bytes(pki.intermediate.pem)
        self.state = tmp / "state"
        self.image = tmp / "disk.raw"
        self.image.write_bytes(b"\x00" * 65536 + b"guest")

    def release(self, version: int, expires: str = "90d") -> Path:
        manifest = self.tmp / f"m{version}.json"
        envelope = self.tmp / f"disk.v{version}.hgsig"
        args = ["manifest", "create", str(self.image), "--name", "web", "--version", str(version)]
        args += ["--format", "raw", "--reader", "none", "--quiet", "--expires", expires, "-o", str(manifest)]
        assert main(args) == 0
        sign = ["sign", str(manifest), "--key", str(self.key), "--cert", str(self.cert), "--chain", str(self.chain)]
        assert main([*sign, "-o", str(envelope)]) == 0
        return envelope


@pytest.fixture
def host(tmp_path: Path, pki: TestPKI) -> Host:
    return Host(tmp_path, pki)


Run = tuple[int, str, dict[str, object] | None, list[tuple[str, int]]]


def run(capsys: pytest.CaptureFixture[str], state: Path, argv: list[str]) -> Run:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    doc = json.loads(out.out) if out.out.strip() else None
    if isinstance(doc, dict):
        doc.pop("cached_verdict", None)
        for disk in doc.get("disks", []):
            disk.pop("cached", None)
    with sqlite3.connect(state / "state.db") as db:
        versions = sorted(db.execute("SELECT name, version FROM versions").fetchall())
    return code, out.err, doc, versions


def cold_copy(state: Path, dest: Path) -> Path:
    """The same rollback state with every cache emptied."""
    shutil.copytree(state, dest)
    with sqlite3.connect(dest / "state.db") as db:
        db.execute("DELETE FROM verdicts")
        db.execute("DELETE FROM digests")
        db.execute("DELETE FROM parsed")
    return dest


def fast_argv(host: Host, envelope: Path, state: Path, extra: tuple[str, ...]) -> list[str]:
    return [
        "verify",
        str(envelope),
        "--trust",
        str(host.trust),
        "--image",
        str(host.image),
        "--state",
        str(state),
        *extra,
    ]


def full_argv(host: Host, envelope: Path, state: Path, extra: tuple[str, ...]) -> list[str]:
    # The `--opt=value` spelling is outside parse_simple_argv's forms: argparse reads it.
    return ["verify", str(envelope), f"--trust={host.trust}", f"--image={host.image}", f"--state={state}", *extra]


def compare(
    host: Host, capsys: pytest.CaptureFixture[str], envelope: Path, extra: tuple[str, ...] = ()
) -> tuple[Run, Run]:
    """Run the fast path on the warm state and the full path on a cold copy; both must agree."""
    cold = cold_copy(host.state, host.tmp / f"cold-{len(list(host.tmp.glob('cold-*')))}")
    assert parse_simple_argv(fast_argv(host, envelope, host.state, extra)[1:]) is not None
    assert parse_simple_argv(full_argv(host, envelope, cold, extra)[1:]) is None
    fast = run(capsys, host.state, fast_argv(host, envelope, host.state, extra))
    full = run(capsys, cold, full_argv(host, envelope, cold, extra))
    assert fast == full
    return fast, full


def warm(host: Host, capsys: pytest.CaptureFixture[str], envelope: Path, extra: tuple[str, ...] = ()) -> None:
    code, err, _, _ = run(capsys, host.state, fast_argv(host, envelope, host.state, extra))
    assert code == 0, err
    with sqlite3.connect(host.state / "state.db") as db:
        assert db.execute("SELECT count(*) FROM verdicts").fetchone()[0] >= 1
        assert db.execute("SELECT count(*) FROM digests").fetchone()[0] >= 1


Scenario = Callable[[Host, pytest.CaptureFixture[str]], tuple[Path, tuple[str, ...], int]]


def cached(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    env = host.release(1)
    warm(host, capsys, env)
    return env, (), 0


def uncached(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    from hostguard.host.state import StateStore

    StateStore(host.state).close()  # an empty state: nothing cached yet
    return host.release(1), (), 0


def rollback(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    v1, v2 = host.release(1), host.release(2)
    warm(host, capsys, v1)  # v1's verdict is cached...
    warm(host, capsys, v2)  # ...and then version 2 was verified on this host
    return v1, (), 1


def changed_image(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    env = host.release(1)
    warm(host, capsys, env)
    with host.image.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"X")
    return env, (), 1


def changed_trust_dir(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    env = host.release(1)
    warm(host, capsys, env)
    shutil.rmtree(host.trust)
    TestPKI().write_trust_dir(host.trust)  # another root: the chain no longer verifies
    return env, (), 1


def expired_window(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    env = host.release(1, expires="30d")
    warm(host, capsys, env)
    import datetime as dt

    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=45)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return env, ("--at", later), 1


def crl_added(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    env = host.release(1)
    warm(host, capsys, env)
    host.pki.write_trust_dir(host.trust, crls=[host.pki.crl([host.pki.leaf.cert])])
    return env, (), 1


def corrupt_cache_entry(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[Path, tuple[str, ...], int]:
    env = host.release(1)
    warm(host, capsys, env)
    with sqlite3.connect(host.state / "state.db") as db:
        db.execute("UPDATE verdicts SET result = json_set(result, '$.facts.version', 'one')")
    return env, (), 0


@pytest.mark.parametrize(
    "scenario",
    [cached, uncached, rollback, changed_image, changed_trust_dir, expired_window, crl_added, corrupt_cache_entry],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_fast_and_full_paths_agree(
    host: Host, capsys: pytest.CaptureFixture[str], scenario: Scenario, as_json: bool
) -> None:
    envelope, extra, expected = scenario(host, capsys)
    (code, err, doc, _), _ = compare(host, capsys, envelope, extra + (("--json",) if as_json else ()))
    assert code == expected, err
    assert len(err.strip().splitlines()) <= 1
    if expected == 0:
        assert (doc or {}).get("verdict", "allow") == "allow" and ("allowed: web v1" in err or as_json)
    else:
        assert err.startswith("denied: ") and (doc is None or doc["verdict"] == "deny")


def test_a_cached_reverification_uses_no_cryptography_and_no_argparse(host: Host, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = host.release(1)
    argv = fast_argv(host, env, host.state, ())
    assert main(argv) == 0
    probe = (
        "import sys; from hostguard.cli import main; rc = main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('cryptography', 'argparse', 'dataclasses', 'typing', 'hostguard.signed.manifest', "
        "'tomllib', 'lxml', 'datetime', 'logging', 'sqlite3') if m in sys.modules); "
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr


# --- the argv reader answers as argparse does, or not at all ------------------------------------------------

WORDS = st.sampled_from(
    [
        *("--trust", "--image", "--kernel", "--initrd", "--state", "--at", "--json", "-v", "-h", "--help", "--tr"),
        *("--image=x", "--", "-", "-x", "env.hgsig", "/t", "/img", "", "a b", "--jso", "2026-01-01T00:00:00Z"),
    ]
)


def argparse_options(words: list[str]) -> VerifyOptions | None:
    parser = build_parser()
    parser.exit_on_error = False
    try:
        ns = parser.parse_args(["verify", *words])
    except (SystemExit, argparse.ArgumentError):
        return None
    return VerifyOptions.from_namespace(ns)


@settings(max_examples=500, deadline=None)
@given(st.lists(WORDS, max_size=9))
def test_simple_argv_reader_agrees_with_argparse(words: list[str]) -> None:
    ours = parse_simple_argv(words)
    if ours is not None:
        assert argparse_options(words) == ours, words


@pytest.mark.parametrize(
    "words",
    [
        ["e", "--trust", "/t"],
        ["--trust", "/t", "e", "--image", "a", "--image", "b", "--json"],
        ["e", "--trust", "/t", "--state", "/s", "--kernel", "k", "--initrd", "i", "--at", "2026-01-01T00:00:00Z"],
    ],
)
def test_plain_spellings_are_read_without_argparse(words: list[str]) -> None:
    ours = parse_simple_argv(words)
    assert ours is not None and ours == argparse_options(words)
