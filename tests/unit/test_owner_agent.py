"""The guest agent: firmware token readers, boot states, persistence, payload application, and the bundle run
by the guest's own interpreter (Debian's /usr/bin/python3 with python3-cryptography 38, as in the test guest)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from hostguard.owner import bundle, guest_agent, session
from hostguard.owner.guest_agent import Agent, Store, boot, parse_smbios_strings
from hostguard.owner.names import FWCFG_NAME
from hostguard.owner.protocol import Payload, sign_script
from hostguard.owner.tlschannel import generate_key
from hostguard.owner.tokens import BootToken, Secret
from tests.testbed.prereq import require
from tests.unit.owner_fakes import NOW, owner_hash

H = "sha256:" + "12" * 32
# Captured from the python test guest: /sys/firmware/dmi/entries/11-0/raw under QEMU 7.2 with two OEM strings.
REAL_TYPE11 = b"\x0b\x05\x00\x0e\x02hostguard-nosecret:v1:abc\x00second\x00\x00"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _sysfs(root: Path, oem: list[str], fwcfg: bytes | None = None) -> Path:
    entry = root / "firmware/dmi/entries/11-0"
    entry.mkdir(parents=True)
    body = b"".join(s.encode() + b"\0" for s in oem) + b"\0"
    (entry / "raw").write_bytes(b"\x0b\x05\x00\x0e" + bytes([len(oem)]) + body)
    (root / "firmware/dmi/entries/1-0").mkdir(parents=True)
    (root / "firmware/dmi/entries/1-0/raw").write_bytes(b"\x01\x1b" + b"\0" * 30)
    if fwcfg is not None:
        blob = root / "firmware/qemu_fw_cfg/by_name" / FWCFG_NAME
        blob.mkdir(parents=True)
        (blob / "raw").write_bytes(fwcfg)
    return root


def test_smbios_type11_strings_as_qemu_exposes_them() -> None:
    assert parse_smbios_strings(REAL_TYPE11) == ["hostguard-nosecret:v1:abc", "second"]
    assert parse_smbios_strings(b"\x0b\x05\x00\x0e\x00\x00\x00") == []
    for bad in (b"", b"\x0b\x02\x00", b"\x0b\xff\x00\x00\x01", b"\x0b\x05" + b"\0" * 70000):
        with pytest.raises(Exception, match="SMBIOS"):
            parse_smbios_strings(bad)


def test_boot_no_secrets_token(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path / "sys", ["vendor", BootToken("no-secrets", H).encode()])
    booted = boot(Store(tmp_path / "state"), sysfs)
    assert booted.error is None and booted.state.protocol == "no-secrets" and booted.state.owner_pin == H
    assert booted.state.secret is None and not booted.state.paired and "keygen" in booted.timings
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state/vm.key").stat().st_mode) == 0o600
    again = boot(Store(tmp_path / "state"), sysfs)  # the key survives a reboot
    assert again.state.vm_key == booted.state.vm_key and "key_load" in again.timings


def test_boot_shared_secret_reads_k_and_commits_to_it(tmp_path: Path) -> None:
    k = Secret.generate()
    sysfs = _sysfs(tmp_path / "sys", ["hgowner1:shared-secret"], k.encode().rstrip(b"\n"))
    booted = boot(Store(tmp_path / "state"), sysfs)
    assert booted.error is None and booted.state.secret is not None
    assert booted.state.secret.check() == k.check() == booted.k_check
    state_files = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    assert k.encode()[5:-1] not in state_files  # K is never written in the guest


@pytest.mark.parametrize(
    ("oem", "fwcfg", "error"),
    [
        (["hgowner1:no-secrets:sha256:12"], None, "token-malformed"),
        (["hgowner1:shared-secret", BootToken("no-secrets", H).encode()], None, "token-ambiguous"),
        (["hgowner1:shared-secret"], None, "secret-missing"),
        (["hgowner1:shared-secret"], b"hgk1.short", "secret-malformed"),
        ([], None, None),
    ],
)
def test_boot_errors_are_announced_not_fatal(tmp_path: Path, oem: list[str], fwcfg: bytes | None, error: str) -> None:
    booted = boot(Store(tmp_path / "state"), _sysfs(tmp_path / "sys", oem, fwcfg))
    assert booted.error == error and booted.state.secret is None
    agent = Agent(Store(tmp_path / "state"), booted, tmp_path / "ak")
    ann = agent.announcement("0" * 32)
    assert ann.state == ("error" if error else "unpaired") and ann.error == error and ann.vm_key


def test_pairing_survives_reboot_and_overrides_later_tokens(tmp_path: Path) -> None:
    k = Secret.generate()
    store = Store(tmp_path / "state")
    booted = boot(store, _sysfs(tmp_path / "sys", ["hgowner1:shared-secret"], k.encode()))
    agent = Agent(store, booted, tmp_path / "ak")
    agent.paired(H, "shared-secret")
    assert stat.S_IMODE((tmp_path / "state/pairing.json").stat().st_mode) == 0o600
    # next boot: the site now offers a different owner through a no-secrets token
    other = "sha256:" + "34" * 32
    rebooted = boot(store, _sysfs(tmp_path / "sys2", [BootToken("no-secrets", other).encode()]))
    assert rebooted.state.paired and rebooted.state.owner_pin == H and rebooted.state.secret is None
    assert Agent(store, rebooted, tmp_path / "ak").announcement("0" * 32).state == "paired"


def test_apply_installs_keys_and_runs_signed_scripts(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    booted = boot(store, _sysfs(tmp_path / "sys", []))
    ak = tmp_path / "root/.ssh/authorized_keys"
    agent = Agent(store, booted, ak)
    owner = generate_key()
    marker = tmp_path / "marker"
    key_line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me"
    payload = Payload(
        (key_line,),
        (
            sign_script(owner, "ok", f"#!/bin/sh\necho done > {marker}\n".encode()),
            sign_script(owner, "fails", b"#!/bin/sh\nexit 3\n"),
        ),
    )
    results = agent.apply(payload)
    assert ak.read_text() == key_line + "\n" and stat.S_IMODE(ak.stat().st_mode) == 0o600
    assert stat.S_IMODE(ak.parent.stat().st_mode) == 0o700
    assert marker.read_text() == "done\n"
    assert [r.get("exit") for r in results] == [None, 0, 3]


# --- the bundle -------------------------------------------------------------------------------------------------


def test_bundle_is_reproducible_and_holds_only_the_core() -> None:
    data = bundle.bundle_bytes()
    assert data == bundle.bundle_bytes() and data.startswith(b"#!/usr/bin/python3\n")
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == sorted(["__main__.py", *bundle.BUNDLE_FILES])
        for name in bundle.BUNDLE_FILES:  # nothing outside the bundle is imported at module level
            source = zf.read(name).decode()
            for line in source.splitlines():
                if line.startswith(("import ", "from ")) and "hostguard" in line:
                    module = line.split()[1]
                    assert f"{module.replace('.', '/')}.py" in bundle.BUNDLE_FILES or module in ("hostguard",), line


def _system_python_with_cryptography_38() -> None:
    require(SYSTEM_PYTHON.exists(), "no /usr/bin/python3 (Debian python3) to play the guest")
    out = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", "import cryptography; print(cryptography.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    require(out.returncode == 0, "python3-cryptography is not installed for /usr/bin/python3")


def test_bundle_runs_under_the_guest_interpreter(tmp_path: Path) -> None:
    _system_python_with_cryptography_38()
    agent = tmp_path / "hostguard-guest"
    bundle.build_agent(agent)
    sysfs = _sysfs(tmp_path / "sys", [BootToken("no-secrets", H).encode()])
    out = subprocess.run(
        [SYSTEM_PYTHON, "-I", agent, "--announce", "--state-dir", tmp_path / "state", "--sysfs", sysfs],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ready vm_key=sha256:" in out.stdout and "protocol=no-secrets state=unpaired" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("protocol", ["shared-secret", "no-secrets"])
def test_owner_on_host_against_agent_on_guest_python_over_tcp(tmp_path: Path, protocol: str) -> None:
    """Host side on this venv's cryptography, agent on Debian's cryptography 38: the real version pair."""
    _system_python_with_cryptography_38()
    agent_file = tmp_path / "hostguard-guest"
    bundle.build_agent(agent_file)
    owner = generate_key()
    k = Secret.generate()
    oem = (
        ["hgowner1:shared-secret"]
        if protocol == "shared-secret"
        else [BootToken("no-secrets", owner_hash(owner)).encode()]
    )
    sysfs = _sysfs(tmp_path / "sys", oem, k.encode() if protocol == "shared-secret" else None)
    port = _free_port()
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [
            SYSTEM_PYTHON,
            "-I",
            agent_file,
            "--state-dir",
            tmp_path / "state",
            "--sysfs",
            sysfs,
            "--no-ports",
            "--listen-tcp",
            f"127.0.0.1:{port}",
            "--authorized-keys",
            tmp_path / "ak",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "agent did not start"
                time.sleep(0.1)
        vm_key: str | None = None  # shared-secret: K authenticates the VM, its key is learnt in the exchange
        with sock:
            if protocol == "no-secrets":
                ready = subprocess.run(
                    [
                        SYSTEM_PYTHON,
                        "-I",
                        agent_file,
                        "--announce",
                        "--state-dir",
                        tmp_path / "state",
                        "--sysfs",
                        sysfs,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                vm_key = ready.split("vm_key=")[1].split()[0]
            payload = Payload((), (sign_script(owner, "mark", f"#!/bin/sh\necho hi > {marker}\n".encode()),))
            result = session.owner_session(
                sock, owner, secret=k if protocol == "shared-secret" else None, vm_pin=vm_key, payload=payload, now=NOW
            )
        assert result.applied is not None and marker.read_text() == "hi\n"
        assert json.loads((tmp_path / "state/pairing.json").read_text())["owner_key"] == owner_hash(owner)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert "paired with owner" in output and k.encode()[5:-1].decode() not in output


def test_agent_main_refuses_to_run_with_nothing_to_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sysfs = _sysfs(tmp_path / "sys", [])
    assert guest_agent.main(["--state-dir", str(tmp_path / "s"), "--sysfs", str(sysfs), "--no-ports"]) == 1
    assert "nothing to serve" in capsys.readouterr().out


def test_main_module_runs_as_a_program() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hostguard.owner.guest_agent", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--state-dir" in out.stdout
    assert os.access(bundle.source_root() / "hostguard/owner/guest_agent.py", os.R_OK)
