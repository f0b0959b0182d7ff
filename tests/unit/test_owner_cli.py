"""The owner's commands as the `hostguard` CLI runs them: exit codes and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hostguard import cli
from hostguard.commands.owner_cmd import add_subcommands
from hostguard.owner.tlschannel import generate_key
from hostguard.owner.tokens import Secret
from tests.unit.owner_fakes import O2V, Cut, SocketCutRelay, Vm, clean_counts, owner_hash


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="hostguard")
    add_subcommands(parser.add_subparsers(dest="command", required=True), cli._lazy)
    args = parser.parse_args(argv)
    code = cli._run(lambda: int(args.func(args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_writes_a_private_key_and_prints_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "owner.key"
    code, out, _ = run(["owner", "keygen", "-o", str(key)], capsys)
    assert code == 0 and out.startswith("sha256:") and stat.S_IMODE(key.stat().st_mode) == 0o600
    code, out2, _ = run(["owner", "key-hash", str(key)], capsys)
    assert code == 0 and out2 == out
    code, _, err = run(["owner", "keygen", "-o", str(key)], capsys)
    assert code == 2 and "refusing to overwrite" in err and err.count("\n") == 1


def test_connect_needs_a_secret_or_a_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    run(["owner", "keygen", "-o", str(key)], capsys)
    code, _, err = run(["owner", "connect", "unix:/nonexistent", "--key", str(key)], capsys)
    assert code == 2 and "--secret-file" in err


def test_world_readable_secret_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    run(["owner", "keygen", "-o", str(key)], capsys)
    secret = tmp_path / "secret"
    secret.write_bytes(Secret.generate().encode())
    os.chmod(secret, 0o644)
    code, _, err = run(["owner", "connect", "/x.sock", "--key", str(key), "--secret-file", str(secret)], capsys)
    assert code == 2 and "readable by others" in err


def test_unreachable_endpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    run(["owner", "keygen", "-o", str(key)], capsys)
    code, _, err = run(
        ["owner", "connect", str(tmp_path / "none.sock"), "--key", str(key), "--vm-key-hash", "ab" * 32], capsys
    )
    assert code == 1 and "cannot connect" in err and err.count("\n") == 1


def _serve_vm_on_unix(vm: Vm, path: Path, sessions: int = 1) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run_once() -> None:
        for _ in range(sessions):
            conn, _ = server.accept()
            conn.settimeout(10)
            with contextlib.suppress(Exception):  # the test inspects the owner's side
                vm.serve(conn)
        server.close()

    t = threading.Thread(target=run_once, daemon=True)
    t.start()
    return t


def _owner_with_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Secret, Path]:
    """An owner key file, and K in the owner's secret file (0600) as the site hands it over."""
    key = tmp_path / "owner.key"
    run(["owner", "keygen", "-o", str(key)], capsys)
    k = Secret.generate()
    secret = tmp_path / "k"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, k.encode())
    os.close(fd)
    return key, k, secret


def test_connect_shared_secret_pins_and_shreds_k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, k, secret = _owner_with_secret(tmp_path, capsys)
    vm = Vm.shared_secret(Secret.parse(k.encode()))
    t = _serve_vm_on_unix(vm, tmp_path / "vm.sock")
    code, out, err = run(
        ["owner", "connect", f"unix:{tmp_path / 'vm.sock'}", "--key", str(key), "--secret-file", str(secret), "--json"],
        capsys,
    )
    t.join(10)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["vm_key"] == vm.key_hash and doc["auth"] == "secret"
    assert not secret.exists()  # K is worthless now and gone from the owner's disk


def test_connect_wrong_vm_key_exits_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "owner.key"
    run(["owner", "keygen", "-o", str(key)], capsys)
    from hostguard.owner.owner_client import load_owner_key

    vm = Vm.no_secrets(owner_hash(load_owner_key(key)))
    t = _serve_vm_on_unix(vm, tmp_path / "vm.sock")
    code, _, err = run(
        ["owner", "connect", str(tmp_path / "vm.sock"), "--key", str(key), "--vm-key-hash", "00" * 32], capsys
    )
    t.join(10)
    assert code == 1 and err.startswith("denied: owner authentication: VM key sha256:") and err.count("\n") == 1


def test_payload_file_is_validated_and_scripts_are_signed(tmp_path: Path) -> None:
    from hostguard.errors import FormatError, UsageError
    from hostguard.owner.owner_client import load_payload
    from hostguard.owner.protocol import verify_script

    key = generate_key()
    (tmp_path / "s.sh").write_text("#!/bin/sh\necho hi\n")
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"scripts": [{"name": "hello", "path": "s.sh"}]}))
    payload = load_payload(good, key)
    verify_script(key.public_key(), payload.scripts[0])
    for bad, error in (
        ({"scripts": [{"name": "../x", "path": "s.sh"}]}, FormatError),
        ({"authorized_keys": ["not a key"]}, FormatError),
        ({"unknown": 1}, UsageError),
        ({"scripts": [{"name": "x", "path": "missing.sh"}]}, UsageError),
    ):
        good.write_text(json.dumps(bad))
        with pytest.raises(error):
            load_payload(good, key)


def test_hook_rule_module_stays_cheap_to_import() -> None:
    """The pre-boot hook may import the fw_cfg rule: it must not pull typing, dataclasses, json or lxml."""
    heavy = ("typing", "dataclasses", "json", "lxml")
    code = f"import sys, hostguard.owner.hookrule; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_connect_cut_after_the_vm_proved_k_keeps_its_key_and_the_rerun_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 through the CLI: a relay cuts (1) the owner's confirm, (2) the VM's ready. Each time the owner's
    one-line error names the verified VM key and where it is kept; the same command run again finishes."""
    key, k, secret = _owner_with_secret(tmp_path, capsys)
    saved = tmp_path / "k.vm-key"
    vm = Vm.shared_secret(Secret.parse(k.encode()))
    confirm = clean_counts("shared-secret")[O2V] - 3  # the owner's units before its confirm
    t = _serve_vm_on_unix(vm, tmp_path / "vm.sock", sessions=4)
    connect = ["owner", "connect", "--key", str(key), "--secret-file", str(secret)]
    for cut, paired in ((Cut(O2V, confirm), False), (Cut(O2V, confirm + 1, "close"), True)):
        relay = SocketCutRelay(tmp_path / "relay.sock", tmp_path / "vm.sock", cut, timeout=10)
        code, _, err = run([*connect[:2], f"unix:{relay.listen}", *connect[2:]], capsys)
        relay.close()
        assert code == 1 and err.count("\n") == 1, err
        assert f"the VM key {vm.key_hash} was verified with K" in err and f"saved in {saved}" in err, err
        assert json.loads(saved.read_text())["vm_key"] == vm.key_hash and secret.exists()
        deadline = time.monotonic() + 10
        while vm.state.paired != paired and time.monotonic() < deadline:  # the VM may still be reading
            time.sleep(0.05)
        assert vm.state.paired == paired  # (2): the VM got the confirm and spent K; the owner holds its key
    code, out, err = run([*connect[:2], f"unix:{tmp_path / 'vm.sock'}", *connect[2:], "--json"], capsys)
    t.join(10)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["vm_key"] == vm.key_hash and doc["auth"] == "pinned" and doc["resumed"] is True
    assert not secret.exists() and not saved.exists()  # K is spent: both shredded
    assert vm.handler.pairings == [(owner_hash(load_owner_key_for_test(key)), "shared-secret")]


def load_owner_key_for_test(path: Path) -> object:
    from hostguard.owner.owner_client import load_owner_key

    return load_owner_key(path)
