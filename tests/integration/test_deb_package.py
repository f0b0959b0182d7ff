"""The Debian package end to end on this host: `make deb`, `apt-get install` it, a signed and a tampered start
through the installed package's hook (real libvirtd), `hostguard doctor` on a good and a broken trust store,
then `apt-get purge` and nothing it installed is left.

Slow (builds the venv, boots a TCG guest) and host-wide (installs a package and the hook): it holds the test
bed's host lock from the install to the purge.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv, host_exclusive
from tests.testbed.prereq import require, require_root, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.packaging]
REPO = Path(__file__).resolve().parents[2]
VENV = Path("/opt/venvs/hostguard")
HOOK = Path("/etc/libvirt/hooks/qemu.d/50-hostguard")
INSTALLED = [
    VENV,
    Path("/usr/bin/hostguard"),
    Path("/lib/systemd/system/hostguardd.service"),
    Path("/etc/logrotate.d/hostguard"),
    Path("/usr/share/man/man1/hostguard.1.gz"),
    Path("/usr/share/man/man1/hostguard-doctor.1.gz"),
    Path("/usr/share/man/man5/hostguard.toml.5.gz"),
    Path("/usr/share/bash-completion/completions/hostguard"),
    Path("/usr/share/doc/hostguard/examples/hostguard.toml"),
]
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "--no-install-recommends"]


def run(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
    return done


def installed() -> bool:
    status = run("dpkg-query", "-W", "-f=${Status}", "hostguard", check=False).stdout
    return "install ok installed" in status


def doctor(config: Path) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    done = run("/usr/bin/hostguard", "doctor", "--config", str(config), "--json", check=False)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for check in json.loads(done.stdout)["checks"]:
        by_name.setdefault(check["check"], []).append(check)
    return done.returncode, by_name


def start_error(dom: Any) -> str:
    import libvirt

    try:
        dom.create()
    except libvirt.libvirtError as err:
        return str(err)
    pytest.fail("the tampered domain started")


@pytest.fixture(scope="module")
def deb() -> Path:
    require_root()
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "apt-get"):
        require_tool(tool)
    run("make", "-C", str(REPO), "deb", timeout=1800)
    (package,) = (REPO / "build" / "deb").glob("hostguard_*_amd64.deb")
    return package


def test_lintian_is_clean(deb: Path) -> None:
    # Every override in packaging/debian/hostguard.lintian-overrides says why; anything else is a finding.
    lintian = require_tool("lintian")
    done = run(lintian, "--tag-display-limit", "0", str(deb), check=False)
    findings = [ln for ln in done.stdout.splitlines() if ln.startswith(("E:", "W:"))]
    assert not findings, findings


def test_install_guard_doctor_and_purge(deb: Path, busybox_guest: Guest) -> None:
    require(not installed(), "a hostguard package is already installed on this host")
    with host_exclusive():
        require(not HOOK.exists(), f"{HOOK} is already installed by someone else")
        host = GuardedHost(install_hook=False)
        try:
            _install_and_check(deb, host, busybox_guest)
        finally:
            if installed():
                run(*APT, "purge", "hostguard", check=False)
            host.close()
            if HOOK.exists() and b"hostguard libvirt hook shim" in HOOK.read_bytes():
                HOOK.unlink()
            run("bash", str(REPO / "scripts" / "libvirtd.sh"), "restart", check=False)


def _install_and_check(deb: Path, host: GuardedHost, guest: Guest) -> None:
    run(*APT, "install", str(deb))
    assert run("/usr/bin/hostguard", "--version").stdout.strip().startswith("hostguard ")
    for path in INSTALLED:
        assert path.exists(), path
    # Installing never surprises a running host: no hook, and hostguardd is not enabled.
    assert not HOOK.exists()
    assert not Path("/etc/systemd/system/multi-user.target.wants/hostguardd.service").exists()

    signed = host.publish(guest, "busybox", 1)
    run("/usr/bin/hostguard", "hook", "install", "--config", str(host.config), "--restart-libvirtd")
    assert HOOK.read_bytes().startswith(f"#!{VENV}/bin/python".encode())  # the package's venv, not a checkout

    with LibvirtEnv() as env:
        dom = env.define_guest("deb-signed", guest, disk_path=env.overlay(signed, "deb-signed.qcow2"))
        dom.create()
        env.wait_for_console(dom, guest.marker, timeout=180)
        dom.destroy()
        tampered = env.tampered_copy(signed, "deb-tampered.qcow2")
        bad = env.define_guest("deb-tampered", guest, disk_path=tampered)
        assert "hostguard: denied" in (text := start_error(bad)) and "disk digest:" in text, text
    verdicts = [r.get("verdict") for r in host.audit_records() if str(r.get("domain", "")).endswith("deb-signed")]
    assert "allow" in verdicts

    code, checks = doctor(host.config)
    assert checks["hook"][0]["status"] == "ok" and checks["hook active"][0]["status"] == "ok"
    assert checks["trust store"][0]["status"] == "ok" and checks["configuration"][0]["status"] == "ok"
    root = host.trust / "roots" / "root.pem"
    root.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    code, checks = doctor(host.config)
    assert code == 1 and checks["trust store"][0]["status"] == "fail"

    # Purge: hook, unit, venv, man pages, completion, logrotate file all gone; the admin's data stays.
    audit_log = host.audit_log
    run(*APT, "purge", "hostguard")
    leftovers = [str(p) for p in [*INSTALLED, HOOK] if p.exists() or p.is_symlink()]
    assert not leftovers, leftovers
    assert run("dpkg-query", "-W", "hostguard", check=False).returncode != 0
    assert audit_log.exists()
