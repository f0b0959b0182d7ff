"""The rename window between `prepare` and QEMU's open (issue 14, ADR 0018), against the real libvirtd.

A test-only hook script, `qemu.d/60-swap`, runs after 50-hostguard for the same event (libvirt runs qemu.d in
name order) and renames an unsigned, bootable qcow2 over the verified signed base of the domain's overlay: at
`prepare` (after hostguard verified it) or at `start` (after hostguard's `start` check, just before QEMU
opens the chain). Either way the guest must never run: the first is refused at `start begin`, before QEMU
exists; the second at `started begin`, where the hook finds the swapped file among those QEMU holds and
kills QEMU."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_preboot_hook import denial, start_error
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration


@pytest.fixture
def swap_hook(host: GuardedHost) -> Iterator[Path]:
    script = host.hooks_dir / "qemu.d" / "60-swap"
    yield script
    script.unlink(missing_ok=True)


def arm(script: Path, domain: str, op: str, evil: Path, target: Path) -> None:
    script.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        f'if [ "$1" = "{domain}" ] && [ "$2" = "{op}" ] && [ "$3" = "begin" ]; then mv -f "{evil}" "{target}"; fi\n'
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def swapped_domain(env: LibvirtEnv, signed_base: Path, guest: Guest, name: str) -> tuple[Any, Path, Path]:
    """A domain on an overlay over its own copy of the signed base, and an unsigned bootable image to swap in."""
    base = env.copy_disk(signed_base, f"{name}-base.qcow2")
    Path(f"{base}.hgsig").write_bytes(Path(f"{signed_base}.hgsig").read_bytes())
    overlay = env.overlay(base, f"{name}-top.qcow2")
    evil = env.copy_disk(guest.root_qcow2, f"{name}-unsigned.qcow2")
    return env.define_guest(name, guest, disk_path=overlay), base, evil


def test_a_base_renamed_over_after_prepare_is_refused_before_qemu_starts(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest, swap_hook: Path
) -> None:
    dom, base, evil = swapped_domain(libvirt_env, signed_base, busybox_guest, "swap-prep")
    arm(swap_hook, dom.name(), "prepare", evil, base)
    line = denial(start_error(dom))
    assert f"{base} was replaced after it was verified" in line
    assert not dom.isActive()
    assert busybox_guest.marker not in libvirt_env.console_text(dom)
    (record,) = [r for r in host.audit_records() if r.get("operation") == "start" and r.get("verdict") == "deny"]
    assert record["domain"] == dom.name()


def test_a_base_renamed_over_just_before_qemu_opens_it_is_found_in_qemu_and_the_guest_never_runs(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest, swap_hook: Path
) -> None:
    dom, base, evil = swapped_domain(libvirt_env, signed_base, busybox_guest, "swap-start")
    evil_ino = os.stat(evil).st_ino
    arm(swap_hook, dom.name(), "start", evil, base)
    line = denial(start_error(dom))
    # QEMU really opened the unsigned image (the attack worked up to here); the hook found and killed it.
    assert f"QEMU opened {base} as device/inode" in line and f"/{evil_ino}, not the verified file" in line
    assert line.rstrip().endswith("; QEMU was killed")
    assert not dom.isActive()
    assert busybox_guest.marker not in libvirt_env.console_text(dom)
    started = [r for r in host.audit_records() if r.get("operation") == "started" and r.get("domain") == dom.name()]
    assert [r["verdict"] for r in started] == ["deny"]


def test_an_unswapped_domain_passes_start_and_started_and_boots(
    host: GuardedHost, signed_base: Path, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    dom, _, _ = swapped_domain(libvirt_env, signed_base, busybox_guest, "swap-none")
    dom.create()
    libvirt_env.wait_for_console(dom, busybox_guest.marker, timeout=180)
