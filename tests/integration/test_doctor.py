"""`hostguard doctor` on the real host: the hook installed into the running libvirtd, a good and a broken
trust store, and a hook changed after libvirtd started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.prereq import require

pytestmark = pytest.mark.integration


def doctor(host: GuardedHost) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    done = subprocess.run(
        [sys.executable, "-m", "hostguard.cli", "doctor", "--config", str(host.config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    by_name: dict[str, list[dict[str, Any]]] = {}
    for check in json.loads(done.stdout)["checks"]:
        by_name.setdefault(check["check"], []).append(check)
    return done.returncode, by_name


def test_doctor_sees_the_active_hook_and_the_trust_store(host: GuardedHost) -> None:
    code, checks = doctor(host)
    assert checks["libvirt"][0]["status"] == "ok" and "qemu.d" in checks["libvirt"][0]["message"]
    assert [c["status"] for c in checks["hook"]] == ["ok"]
    assert checks["hook active"][0]["status"] == "ok", checks["hook active"]
    assert checks["configuration"][0]["status"] == "ok"
    assert checks["trust store"][0]["status"] == "ok"
    assert checks["CRL"][0]["status"] in ("ok", "warn") and "stale in" in checks["CRL"][0]["message"]
    # No hostguardd runs for this host's socket: that is a failure, so the exit code is 1.
    assert checks["daemon"][0]["status"] == "fail" and code == 1


def test_doctor_fails_a_broken_trust_store(host: GuardedHost) -> None:
    root = host.trust / "roots" / "root.pem"
    good = root.read_bytes()
    try:
        root.write_bytes(good.replace(b"\n", b"\n#", 3))
        code, checks = doctor(host)
        assert checks["trust store"][0]["status"] == "fail" and code == 1
        assert "every start in scope is denied" in checks["trust store"][0]["action"]
    finally:
        root.write_bytes(good)


def test_doctor_flags_a_hook_changed_after_libvirtd_started(host: GuardedHost) -> None:
    hook = host.installed_hook()
    others = [p for p in hook.parent.iterdir() if p != hook] + [host.hooks_dir / "qemu"]
    require(not any(p.exists() for p in others), "another qemu hook on this host keeps libvirtd's qemu hooks enabled")
    hook.chmod(0o755)  # a new ctime, as a reinstall gives
    _, checks = doctor(host)
    active = checks["hook active"][0]
    assert active["status"] == "fail" and "installed after libvirtd started" in active["message"]
    subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[2] / "scripts" / "libvirtd.sh"), "restart"], check=True
    )
    _, checks = doctor(host)
    assert checks["hook active"][0]["status"] == "ok"
