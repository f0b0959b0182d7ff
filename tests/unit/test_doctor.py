"""`hostguard doctor` against temp directories: a fake /proc, hook directory, trust store, sockets and domains."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.cli import main
from hostguard.commands.hook_cmd import render_shim
from hostguard.host import doctor
from hostguard.host.doctor import FAIL, OK, WARN, Check, HostView
from tests.testbed.pki import NOW, TestPKI
from tests.testbed.prereq import require_module

UUID = "dc1efd3f-d54a-4aa1-9a77-c39c9a611ff3"


def statuses(checks: list[Check], name: str) -> list[str]:
    return [c.status for c in checks if c.name == name]


class FakeProc:
    """A /proc with one libvirtd whose start time we choose."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.btime = int(time.time()) - 1000
        (root / "stat").write_text(f"cpu 1 2 3\nbtime {self.btime}\n")

    def add(self, pid: int, comm: str, started_at: float) -> None:
        d = self.root / str(pid)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        ticks = round((started_at - self.btime) * os.sysconf("SC_CLK_TCK"))
        # field 22 is starttime; the comm in parentheses may contain spaces
        rest = " ".join(["S", *["0"] * 18, str(ticks), "0"])
        (d / "stat").write_text(f"{pid} ({comm} x) {rest}\n")


@pytest.fixture
def host(tmp_path: Path) -> tuple[HostView, FakeProc]:
    proc = FakeProc(tmp_path / "proc")
    view = HostView(proc=proc.root, hooks_dir=tmp_path / "hooks", libvirt_version=lambda: (9, 0))
    return view, proc


def install_hook(view: HostView, name: str = doctor.HOOK_NAME, config: str | None = None) -> Path:
    path = view.hooks_dir / "qemu.d" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_shim(config))
    path.chmod(0o755)
    return path


# --- libvirt and the hook ------------------------------------------------------------------------------------


def test_old_libvirt_without_qemu_d_is_a_warning(host: tuple[HostView, FakeProc]) -> None:
    view, proc = host
    view.libvirt_version = lambda: (6, 0)
    proc.add(100, "libvirtd", time.time())
    checks, version, daemon = doctor.check_libvirt(view)
    assert statuses(checks, "libvirt") == [WARN] and daemon == ("libvirtd", 100)
    assert doctor.hook_path(view, version) == view.hooks_dir / "qemu"


def test_no_running_libvirt_daemon_fails(host: tuple[HostView, FakeProc]) -> None:
    view, _ = host
    checks, _, daemon = doctor.check_libvirt(view)
    assert statuses(checks, "libvirt daemon") == [FAIL] and daemon is None


def test_missing_hook_fails(host: tuple[HostView, FakeProc]) -> None:
    view, _ = host
    (check,) = doctor.check_hook(view, (9, 0), None)
    assert check.status == FAIL and "not installed" in check.message and "hook install" in check.action


def test_hook_installed_after_libvirtd_started_is_not_active(host: tuple[HostView, FakeProc]) -> None:
    view, proc = host
    proc.add(100, "libvirtd", time.time() - 60)
    install_hook(view)
    checks = doctor.check_hook(view, (9, 0), ("libvirtd", 100))
    assert statuses(checks, "hook") == [OK]
    (active,) = [c for c in checks if c.name == "hook active"]
    assert active.status == FAIL and "installed after libvirtd started" in active.message
    assert "restart libvirtd" in active.action


def test_hook_installed_before_libvirtd_started_is_active(host: tuple[HostView, FakeProc]) -> None:
    view, proc = host
    install_hook(view)
    proc.add(100, "libvirtd", time.time() + 5)
    assert statuses(doctor.check_hook(view, (9, 0), ("libvirtd", 100)), "hook active") == [OK]


def test_hook_added_beside_an_older_qemu_hook_is_active(host: tuple[HostView, FakeProc]) -> None:
    # libvirtd cached "the qemu driver has hooks" at its start and rescans qemu.d/ at every call.
    view, proc = host
    install_hook(view, "10-other")
    time.sleep(0.05)
    proc.add(100, "libvirtd", time.time())
    time.sleep(0.05)
    install_hook(view)
    (active,) = [c for c in doctor.check_hook(view, (9, 0), ("libvirtd", 100)) if c.name == "hook active"]
    assert active.status == OK and "10-other" in active.message


def test_hook_whose_interpreter_is_gone_fails(host: tuple[HostView, FakeProc]) -> None:
    view, _ = host
    hook = install_hook(view)
    hook.write_bytes(b"#!/opt/venvs/gone/bin/python\n" + hook.read_bytes().split(b"\n", 1)[1])
    (check,) = doctor.check_hook(view, (9, 0), None)
    assert check.status == FAIL and "missing" in check.message


def test_foreign_or_non_executable_hook_fails(host: tuple[HostView, FakeProc]) -> None:
    view, _ = host
    hook = install_hook(view)
    hook.chmod(0o644)
    assert doctor.check_hook(view, (9, 0), None)[0].status == FAIL
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    assert "not hostguard's" in doctor.check_hook(view, (9, 0), None)[0].message


def test_pinned_config_is_read_from_the_installed_hook(host: tuple[HostView, FakeProc], tmp_path: Path) -> None:
    view, _ = host
    hook = install_hook(view, config=str(tmp_path / "pinned.toml"))
    assert doctor.pinned_config(hook) == tmp_path / "pinned.toml"
    assert doctor.pinned_config(install_hook(view, "60-plain")) is None


# --- configuration and trust store ---------------------------------------------------------------------------


def write_config(tmp: Path, trust: Path, extra: str = "", mode: str = "enforce") -> Path:
    path = tmp / "hostguard.toml"
    path.write_text(
        f'[trust]\ndir = "{trust}"\n[state]\ndir = "{tmp / "state"}"\n[policy]\nmode = "{mode}"\n{extra}'
        f'[audit]\nlog = "{tmp / "log" / "audit.jsonl"}"\nsyslog = false\n'
        f'[daemon]\nsocket = "{tmp / "hg.sock"}"\n'
    )
    return path


def test_broken_configuration_fails(tmp_path: Path) -> None:
    path = tmp_path / "hostguard.toml"
    path.write_text('[trust]\ndir = "/x"\n[policy]\nmoed = "audit"\n')
    checks, config = doctor.check_config(path)
    assert config is None and checks[0].status == FAIL and "moed" in checks[0].message


def test_broken_findings_table_fails(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path / "trust", '[findings.action]\nno-such-kind = "pause"\n')
    checks, config = doctor.check_config(path)
    assert config is None and checks[0].status == FAIL


def test_audit_mode_is_a_warning(tmp_path: Path) -> None:
    checks, config = doctor.check_config(write_config(tmp_path, tmp_path / "trust", mode="audit"))
    assert config is not None and statuses(checks, "mode") == [WARN]


def test_good_trust_store_with_a_fresh_crl(tmp_path: Path) -> None:
    pki = TestPKI()
    trust = pki.write_trust_dir(tmp_path / "trust", crls=[pki.crl(next_update=NOW + dt.timedelta(days=30))])
    checks = doctor.check_trust(trust, NOW.timestamp())
    assert [c.status for c in checks] == [OK, OK]
    assert "1 root(s)" in checks[0].message and "stale in 30.0 days" in checks[1].message


def test_crl_close_to_stale_warns_and_stale_crl_fails(tmp_path: Path) -> None:
    pki = TestPKI()
    soon = pki.crl(next_update=NOW + dt.timedelta(days=2))
    stale = pki.crl(last_update=NOW - dt.timedelta(days=9), next_update=NOW - dt.timedelta(days=1))
    checks = doctor.check_trust(pki.write_trust_dir(tmp_path / "trust", crls=[soon, stale]), NOW.timestamp())
    assert sorted(statuses(checks, "CRL")) == [FAIL, WARN]
    assert any("stale in 2.0 days" in c.message for c in checks)


def test_missing_crls_warn_unless_required(tmp_path: Path) -> None:
    pki = TestPKI()
    plain = doctor.check_trust(pki.write_trust_dir(tmp_path / "a"), NOW.timestamp())
    assert statuses(plain, "CRLs") == [WARN]
    required = pki.write_trust_dir(tmp_path / "b", signers_toml='[revocation]\nrequire_crl = ["*"]\n')
    assert statuses(doctor.check_trust(required, NOW.timestamp()), "CRLs") == [FAIL]


def test_broken_trust_store_fails(tmp_path: Path) -> None:
    trust = tmp_path / "trust"
    (trust / "roots").mkdir(parents=True)
    (trust / "roots" / "root.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (check,) = doctor.check_trust(trust, NOW.timestamp())
    assert check.status == FAIL and "every start in scope is denied" in check.action
    pki = TestPKI()
    bad_policy = pki.write_trust_dir(tmp_path / "t2", signers_toml="[[signer]]\nbogus = 1\n")
    assert doctor.check_trust(bad_policy, NOW.timestamp())[0].status == FAIL


# --- daemon, directories, space ------------------------------------------------------------------------------


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "hg.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    server.close()


def test_daemon_down_fails(tmp_path: Path) -> None:
    (check,) = doctor.check_daemon(HostView(), tmp_path / "none.sock")
    assert check.status == FAIL and "not running" in check.message


def test_daemon_running_and_connected(listening: Path) -> None:
    view = HostView(libvirt_clients=lambda: [os.getpid()])
    checks = doctor.check_daemon(view, listening)
    assert [c.status for c in checks] == [OK, OK]
    assert f"pid {os.getpid()}" in checks[0].message


def test_daemon_running_but_not_connected_to_libvirtd_fails(listening: Path) -> None:
    checks = doctor.check_daemon(HostView(libvirt_clients=list), listening)
    assert statuses(checks, "daemon connection") == [FAIL]


def test_stale_socket_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "old.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    (check,) = doctor.check_daemon(HostView(), path)
    assert check.status == FAIL and "does not answer" in check.message


def test_directory_modes(tmp_path: Path) -> None:
    me = os.getuid()
    state = tmp_path / "state"
    assert doctor.check_directory("state", state, private=True, owner=me)[0].status == WARN  # not made yet
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    assert doctor.check_directory("state", state, private=True, owner=me)[0].status == OK
    state.chmod(0o755)
    assert doctor.check_directory("state", state, private=True, owner=me)[0].status == WARN
    state.chmod(0o777)
    assert doctor.check_directory("state", state, private=True, owner=me)[0].status == FAIL
    state.chmod(0o700)
    assert doctor.check_directory("state", state, private=True, owner=me + 1)[0].status == FAIL


def test_audit_log_modes(tmp_path: Path) -> None:
    me = os.getuid()
    log = tmp_path / "log" / "audit.jsonl"
    log.parent.mkdir(mode=0o750)
    log.parent.chmod(0o750)
    log.write_text("")
    log.chmod(0o640)
    assert [c.status for c in doctor.check_audit_log(log, owner=me)] == [OK, OK]
    log.chmod(0o666)
    assert statuses(doctor.check_audit_log(log, owner=me), "audit log") == [FAIL]


def test_free_space_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Vfs:
        f_frsize = 4096
        f_bavail = 0

    def statvfs(_path: object) -> Vfs:
        return Vfs()

    monkeypatch.setattr(os, "statvfs", statvfs)
    for free, expected in ((10 << 20, FAIL), (500 << 20, WARN), (5 << 30, OK)):
        Vfs.f_bavail = free // 4096
        assert doctor.check_space(tmp_path / "not-yet" / "state")[0].status == expected


# --- domains -------------------------------------------------------------------------------------------------


class FakeDomain:
    def __init__(self, name: str, vmcoreinfo: bool) -> None:
        self._name = name
        features = "<features><vmcoreinfo state='on'/></features>" if vmcoreinfo else ""
        self.xml = f"<domain type='qemu'><name>{name}</name><uuid>{UUID}</uuid>{features}</domain>"

    def name(self) -> str:
        return self._name

    def isPersistent(self) -> bool:
        return True

    def XMLDesc(self, _flags: int) -> str:
        return self.xml


class FakeConn:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = domains

    def listAllDomains(self, _flags: int) -> list[FakeDomain]:
        return list(self.domains)


def test_exempt_domains_and_missing_vmcoreinfo_are_warnings(tmp_path: Path) -> None:
    require_module("libvirt")
    from hostguard.host.config import load_config

    config = load_config(write_config(tmp_path, tmp_path / "trust", 'exempt = ["lab-*"]\n'))
    conn = FakeConn(FakeDomain("web", True), FakeDomain("db", False), FakeDomain("lab-1", False))
    checks = doctor.check_domains(HostView(open_libvirt=lambda: conn), config)
    assert checks[0] == Check("domains", OK, "3 domain(s), 1 ready")
    messages = [c.message for c in checks if c.name == "domain"]
    assert any(m.startswith("db: no <vmcoreinfo/>") for m in messages)
    assert any(m.startswith("lab-1: exempt by 'lab-*'") for m in messages)
    assert all(c.status == WARN for c in checks[1:])


# --- the command ---------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


def test_cli_exit_2_and_json_when_the_configuration_is_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[trust\n")
    code, out = run_cli(capsys, "--config", str(bad), "--hooks-dir", str(tmp_path / "hooks"), "--json")
    doc: dict[str, Any] = json.loads(out)
    assert code == 2 and doc["exit"] == 2
    config = [c for c in doc["checks"] if c["check"] == "configuration"]
    assert config[0]["status"] == FAIL and "not valid TOML" in config[0]["message"]


def test_cli_exit_1_on_a_failed_check_with_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = TestPKI()
    trust = pki.write_trust_dir(tmp_path / "trust", crls=[pki.crl(next_update=NOW + dt.timedelta(days=30))])
    config = write_config(tmp_path, trust)
    code, out = run_cli(capsys, "--config", str(config), "--hooks-dir", str(tmp_path / "hooks"))
    assert code == 1  # at least: no hook in the temp hooks dir, no daemon on the temp socket
    lines = [ln for ln in out.splitlines() if not ln.startswith("      -> ")]
    assert all(ln.split()[0] in (OK, WARN, FAIL) for ln in lines)
    assert any(ln.startswith("fail  hook:") for ln in lines)
    assert any(ln.startswith("ok    trust store:") for ln in lines)
