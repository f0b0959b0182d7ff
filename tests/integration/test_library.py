"""The image library through the real libvirtd: add, list, verify, remove, domain create, virsh start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def hg(host: GuardedHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hostguard.cli", *args, "--config", str(host.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def create_domain(
    host: GuardedHost,
    env: LibvirtEnv,
    guest: Guest,
    short: str,
    image: str,
    *,
    memory: int = 128,
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`hostguard domain create` for a test domain (cleaned up with the test's other domains)."""
    name = env.domain_name(short)
    env.names.append(name)
    result = hg(
        host,
        "domain",
        "create",
        name,
        "--image",
        image,
        "--kernel-boot",
        "--memory",
        str(memory),
        "--cmdline",
        guest.cmdline,
        "--images-dir",
        str(env.workdir),
    )
    return name, result


@pytest.fixture(scope="module")
def source(host: GuardedHost, busybox_guest: Guest) -> Path:
    """A signed source outside the library (as a producer would hand it over, e.g. on shared storage)."""
    return host.publish(busybox_guest, "libimg", 1)


@pytest.fixture(scope="module")
def added(host: GuardedHost, source: Path, busybox_guest: Guest) -> str:
    result = hg(
        host,
        "library",
        "add",
        str(source),
        f"{source}.hgsig",
        "--kernel",
        str(busybox_guest.kernel),
        "--initrd",
        str(busybox_guest.initrd),
    )
    assert result.returncode == 0, result.stderr
    return "libimg-v1"


def test_add_then_list_matches_what_was_added(host: GuardedHost, added: str, source: Path) -> None:
    listed = json.loads(hg(host, "library", "list", "--json").stdout)
    entry = next(e for e in listed if e["name"] == added)
    assert (entry["image"], entry["version"], entry["status"]) == ("libimg", 1, "ok")
    assert entry["signers"] == ["O=hostguard tests,CN=acme-build"]
    assert entry["size"] == source.stat().st_size
    lib_image = host.library_dir / f"{added}.qcow2"
    assert oct(lib_image.stat().st_mode & 0o777) == "0o444"


def test_the_pool_is_visible_to_virsh(host: GuardedHost, added: str) -> None:
    pools = subprocess.run(["virsh", "pool-list", "--all"], capture_output=True, text=True, check=True).stdout
    assert host.pool in pools
    vols = subprocess.run(["virsh", "vol-list", host.pool], capture_output=True, text=True, check=True).stdout
    assert f"{added}.qcow2" in vols and f"{added}.qcow2.hgsig" in vols


@pytest.mark.parametrize("attack", ["tampered", "unsigned", "expired"])
def test_add_refuses_bad_sources_with_the_verify_reason(
    host: GuardedHost, libvirt_env: LibvirtEnv, busybox_guest: Guest, source: Path, attack: str
) -> None:
    image = libvirt_env.copy_disk(busybox_guest.root_qcow2, f"{attack}.qcow2")
    envelope = Path(f"{image}.hgsig")
    if attack == "tampered":
        shutil.copyfile(f"{source}.hgsig", envelope)
        with image.open("r+b") as fh:
            fh.seek(1 << 20)
            fh.write(b"X")
        expected = "denied: disk digest:"
    elif attack == "unsigned":
        envelope.write_text("{}")
        expected = "format: envelope"
    else:
        host.sign_custom(image, host.manifest_for(image, busybox_guest, "expired", expired=True))
        expected = "denied: expiry: manifest of expired v1 expired"
    result = hg(host, "library", "add", str(image), str(envelope), "--name", f"bad-{attack}")
    assert result.returncode in (1, 2)
    assert expected in result.stderr, result.stderr
    assert not (host.library_dir / f"bad-{attack}.qcow2").exists()


def test_domain_create_then_virsh_start_boots_through_the_hook(
    host: GuardedHost, added: str, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    name, result = create_domain(host, libvirt_env, busybox_guest, "lib", added, memory=256)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"virsh start {name}"
    xml = subprocess.run(["virsh", "dumpxml", name], capture_output=True, text=True, check=True).stdout
    assert "<vmcoreinfo state='on'/>" in xml and "hostguard:image" in xml
    started = subprocess.run(["virsh", "start", name], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    record = [r for r in host.audit_records() if r.get("domain") == name][-1]
    assert record["verdict"] == "allow" and record["images"][0]["image"] == "libimg"  # type: ignore[index]
    subprocess.run(["virsh", "destroy", name], capture_output=True)


def test_library_image_modified_on_disk_is_caught_by_verify_and_next_start(
    host: GuardedHost, busybox_guest: Guest, libvirt_env: LibvirtEnv
) -> None:
    src = host.publish(busybox_guest, "modme", 1)
    assert (
        hg(
            host,
            "library",
            "add",
            str(src),
            f"{src}.hgsig",
            "--kernel",
            str(busybox_guest.kernel),
            "--initrd",
            str(busybox_guest.initrd),
        ).returncode
        == 0
    )
    name, created = create_domain(host, libvirt_env, busybox_guest, "modme", "modme-v1")
    assert created.returncode == 0, created.stderr
    lib_image = host.library_dir / "modme-v1.qcow2"
    subprocess.run(["chattr", "-i", str(lib_image)], capture_output=True)  # what a root attacker would do first
    lib_image.chmod(0o644)
    with lib_image.open("r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"evil")
    time.sleep(0.01)
    verify = hg(host, "library", "verify")
    assert verify.returncode == 1
    assert "FAILED  modme-v1: disk digest:" in verify.stderr
    assert "ok      libimg-v1" in verify.stderr
    started = subprocess.run(["virsh", "start", name], capture_output=True, text=True)
    assert started.returncode != 0 and "disk digest:" in started.stderr


def test_remove_refuses_while_a_domain_uses_the_image(
    host: GuardedHost, added: str, libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    name, created = create_domain(host, libvirt_env, busybox_guest, "user", added)
    assert created.returncode == 0, created.stderr
    refused = hg(host, "library", "remove", added)
    assert refused.returncode == 2 and name in refused.stderr
