"""The library on a real OCI registry (Debian's docker-registry on loopback, no referrers API: the tag schema):
push, pull by tag and digest, a tampered layer, unsigned and untrusted artifacts, rollback, an interrupted pull
that resumes, sync, and a pulled image booted through the installed hook."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.pki import DAY
from tests.testbed.prereq import require
from tests.testbed.registry import HTPASSWD, CuttingProxy, LocalRegistry

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def hg(host: GuardedHost | None, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    config = ["--config", str(host.config)] if host is not None else []
    return subprocess.run(
        [sys.executable, "-m", "hostguard.cli", *args, *config],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def signed(host: GuardedHost, guest: Guest, name: str, version: int, *, untrusted: bool = False) -> Path:
    """The guest's root disk signed as NAME vVERSION (with its kernel and initrd), without an inventory."""
    from hostguard.host.digest import digest_file
    from hostguard.signed.manifest import BootFiles, DiskEntry, ImageId, Manifest

    image = host.library / f"{name}-v{version}.qcow2"
    shutil.copyfile(guest.root_qcow2, image)
    d = digest_file(image).blob
    now = dt.datetime.now(dt.UTC)
    payload = Manifest(
        image=ImageId(name, version),
        created=now - DAY,
        expires=now + 30 * DAY,
        disks=(DiskEntry(d.sha256, d.size, "qcow2"),),
        boot=BootFiles(digest_file(guest.kernel).blob, digest_file(guest.initrd).blob),
    ).to_bytes()
    host.sign_custom(image, payload, host.pki.unrelated_leaf() if untrusted else None)
    return image


def push(
    registry: LocalRegistry, guest: Guest, image: Path, target: str, env: dict[str, str] | None = None
) -> dict[str, object]:
    result = push_result(registry, guest, image, target, env)
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout)
    return out


def push_result(
    registry: LocalRegistry, guest: Guest, image: Path, target: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return hg(
        None,
        "library",
        "push",
        str(image),
        f"{image}.hgsig",
        registry.url(target),
        "--kernel",
        str(guest.kernel),
        "--initrd",
        str(guest.initrd),
        "--insecure",
        "--json",
        env=env,
    )


def pull(
    host: GuardedHost, source: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return hg(host, "library", "pull", source, "--insecure", "--json", *extra, env=env)


def library_files(host: GuardedHost) -> list[str]:
    return sorted(p.name for p in host.library_dir.iterdir()) if host.library_dir.exists() else []


@pytest.fixture(scope="module")
def pushed(host: GuardedHost, registry: LocalRegistry, busybox_guest: Guest) -> dict[str, object]:
    return push(registry, busybox_guest, signed(host, busybox_guest, "ociimg", 1), "fleet/ociimg:v1")


@pytest.fixture(scope="module")
def pulled(host: GuardedHost, registry: LocalRegistry, pushed: dict[str, object]) -> dict[str, object]:
    result = pull(host, registry.url("fleet/ociimg:v1"))
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout)
    return out


def test_push_stores_a_containerdisk_image_and_the_envelope_as_a_referrer(
    registry: LocalRegistry, pushed: dict[str, object]
) -> None:
    import tarfile

    assert pushed["referrers"] == "tag"  # distribution 2.8 has no referrers API
    layer = registry.blob_file(str(pushed["layer"]))
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar.getmembers()}
    disk = members["disk/ociimg.qcow2"]
    assert (disk.uid, disk.gid) == (107, 107) and disk.isfile()
    assert {"boot/vmlinuz", "boot/initrd"} <= set(members)
    index_dir = registry.storage / "docker/registry/v2/repositories/fleet/ociimg/_manifests/tags"
    assert (index_dir / str(pushed["digest"]).replace(":", "-")).is_dir()


def test_pull_by_tag_on_a_clean_library_adds_the_verified_image(
    host: GuardedHost, pulled: dict[str, object], pushed: dict[str, object]
) -> None:
    assert pulled["name"] == "ociimg-v1" and pulled["digest"] == pushed["digest"]
    assert pulled["resumed_from"] == 0 and pulled["kernel_boot"] is True
    assert pulled["layer_checked_by"] == "signed layout"  # kernel, initrd and disk: each byte signed (ADR 0034)
    assert pulled["signers"] == ["O=hostguard tests,CN=acme-build"]
    assert {"ociimg-v1.qcow2", "ociimg-v1.qcow2.hgsig", "ociimg-v1.kernel", "ociimg-v1.initrd"} <= set(
        library_files(host)
    )
    assert hg(host, "library", "verify", "ociimg-v1").returncode == 0


def test_pull_by_digest(host: GuardedHost, registry: LocalRegistry, pushed: dict[str, object]) -> None:
    result = pull(host, f"{registry.url('fleet/ociimg')}@{pushed['digest']}", "--name", "ociimg-bydigest")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["origin"]["digest"] == pushed["digest"]


def test_tampered_layer_in_the_registry_fails_the_pull_and_adds_nothing(
    host: GuardedHost, registry: LocalRegistry, busybox_guest: Guest
) -> None:
    out = push(registry, busybox_guest, signed(host, busybox_guest, "tampered", 1), "fleet/tampered:v1")
    blob = registry.blob_file(str(out["layer"]))
    data = bytearray(blob.read_bytes())
    data[-4096] ^= 0x01  # one bit of the disk's last blocks: the registry serves it as it is stored
    blob.write_bytes(bytes(data))
    before = library_files(host)
    result = pull(host, registry.url("fleet/tampered:v1"))
    assert result.returncode == 1, result.stderr
    assert "denied: disk digest:" in result.stderr or "does not match its digest" in result.stderr, result.stderr
    assert library_files(host) == before
    assert not (host.library_dir / ".pulling").exists()
    assert not (host.library_dir.parent / f".{host.library_dir.name}.pulling").exists()


def test_unsigned_artifact_is_refused(host: GuardedHost, registry: LocalRegistry, busybox_guest: Guest) -> None:
    out = push(registry, busybox_guest, signed(host, busybox_guest, "unsigned", 1), "fleet/unsigned:v1")
    tags = registry.storage / "docker/registry/v2/repositories/fleet/unsigned/_manifests/tags"
    shutil.rmtree(tags / str(out["digest"]).replace(":", "-"))  # the signature's referrers index is gone
    result = pull(host, registry.url("fleet/unsigned:v1"))
    assert result.returncode == 1
    assert "has no hostguard signature" in result.stderr, result.stderr
    assert not any(n.startswith("unsigned") for n in library_files(host))


def test_envelope_from_an_untrusted_ca_is_refused(
    host: GuardedHost, registry: LocalRegistry, busybox_guest: Guest
) -> None:
    image = signed(host, busybox_guest, "untrusted", 1, untrusted=True)
    push(registry, busybox_guest, image, "fleet/untrusted:v1")
    result = pull(host, registry.url("fleet/untrusted:v1"))
    assert result.returncode == 1
    assert "does not chain to a trusted root" in result.stderr, result.stderr
    assert not any(n.startswith("untrusted") for n in library_files(host))


def test_older_version_after_a_newer_one_is_refused_and_sync_takes_the_newest(
    host: GuardedHost, registry: LocalRegistry, busybox_guest: Guest
) -> None:
    for version in (1, 2):
        push(registry, busybox_guest, signed(host, busybox_guest, "rolling", version), f"fleet/rolling:v{version}")
    synced = hg(host, "library", "sync", "--from", registry.url("fleet/rolling"), "--insecure", "--json")
    assert synced.returncode == 0, synced.stderr
    statuses = {(r.get("image"), r.get("version"), r["status"]) for r in json.loads(synced.stdout)}
    assert ("rolling", 2, "pulled") in statuses
    assert "rolling-v2.qcow2" in library_files(host) and "rolling-v1.qcow2" not in library_files(host)
    again = hg(host, "library", "sync", "--from", registry.url("fleet/rolling"), "--insecure", "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(r["status"] for r in json.loads(again.stdout)) == ["superseded", "up to date"]
    older = pull(host, registry.url("fleet/rolling:v1"))
    assert older.returncode == 1
    assert "denied: rollback:" in older.stderr, older.stderr
    assert "rolling-v1.qcow2" not in library_files(host)


def test_interrupted_pull_resumes_from_what_it_has(
    host: GuardedHost, registry: LocalRegistry, busybox_guest: Guest
) -> None:
    out = push(registry, busybox_guest, signed(host, busybox_guest, "resumed", 1), "fleet/resumed:v1")
    # Cut the connection 1 MiB before the end of the layer: inside the disk, the layer's last member.
    with CuttingProxy(registry.port, int(str(out["layer_size"])) - (1 << 20)) as proxy:
        first = pull(host, f"oci://{proxy.host}/fleet/resumed:v1")
    assert first.returncode == 1
    assert "interrupted at" in first.stderr and "pull again to resume" in first.stderr, first.stderr
    assert not any(n.startswith("resumed") for n in library_files(host))
    # What the first pull keeps for the second is outside the libvirt pool: a refresh lists none of it.
    partial = host.library_dir.parent / f".{host.library_dir.name}.pulling"
    assert list(partial.iterdir())
    from hostguard.host.config import load_config
    from hostguard.library.pool import Library

    Library(load_config(host.config)).refresh_pool()  # defines the pool if no pull made it yet, and rescans it
    volumes = subprocess.run(["virsh", "vol-list", host.pool], capture_output=True, text=True, check=True).stdout
    assert ".pulling" not in volumes and "resumed" not in volumes, volumes
    second = pull(host, registry.url("fleet/resumed:v1"))
    assert second.returncode == 0, second.stderr
    entry = json.loads(second.stdout)
    assert 0 < entry["resumed_from"] < entry["layer_size"]
    assert hg(host, "library", "verify", "resumed-v1").returncode == 0


def test_insecure_is_refused_for_a_registry_that_is_not_loopback(host: GuardedHost) -> None:
    result = pull(host, "oci://registry.example.com/fleet/x:v1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --insecure (plain HTTP) is only allowed for a loopback registry, not registry.example.com"
    ]


def test_domain_create_and_virsh_start_from_a_pulled_image_through_the_hook(
    host: GuardedHost, pulled: dict[str, object], libvirt_env: LibvirtEnv, busybox_guest: Guest
) -> None:
    name = libvirt_env.domain_name("oci")
    libvirt_env.names.append(name)
    created = hg(
        host,
        "domain",
        "create",
        name,
        "--image",
        str(pulled["name"]),
        "--kernel-boot",
        "--memory",
        "256",
        "--cmdline",
        busybox_guest.cmdline,
        "--images-dir",
        str(libvirt_env.workdir),
    )
    assert created.returncode == 0, created.stderr
    started = subprocess.run(["virsh", "start", name], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    record = [r for r in host.audit_records() if r.get("domain") == name][-1]
    assert record["verdict"] == "allow" and record["images"][0]["image"] == "ociimg"  # type: ignore[index]
    subprocess.run(["virsh", "destroy", name], capture_output=True)


def test_registry_basic_auth_takes_credentials_from_the_auth_files_users_keep(
    host: GuardedHost, busybox_guest: Guest, tmp_path: Path
) -> None:
    """A registry with htpasswd (bcrypt) basic auth: without credentials push and pull fail with a line naming
    where credentials are read; with them in a $REGISTRY_AUTH_FILE (podman/skopeo) or a $DOCKER_CONFIG
    config.json (docker), push and pull work; a wrong password fails."""
    import base64
    import os

    require(shutil.which(HTPASSWD) is not None, "htpasswd is not installed (apt install apache2-utils)")
    home = tmp_path / "home"
    home.mkdir()
    base = {"PATH": os.environ["PATH"], "HOME": str(home), "LC_ALL": "C"}  # no ~/.docker/config.json
    with LocalRegistry(basic_auth=("hg-user", "s3cret pass")) as reg:
        image = signed(host, busybox_guest, "authed", 1)

        def auth_file(name: str, password: str, *, docker_style: bool) -> Path:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = (
                {"username": "hg-user", "password": password}
                if docker_style
                else {"auth": base64.b64encode(f"hg-user:{password}".encode()).decode()}
            )
            path.write_text(json.dumps({"auths": {reg.host: entry}}))
            return path

        anonymous = push_result(reg, busybox_guest, image, "fleet/authed:v1", env=base)
        assert anonymous.returncode != 0
        assert "HTTP 401" in anonymous.stderr and "REGISTRY_AUTH_FILE" in anonymous.stderr, anonymous.stderr

        podman = {**base, "REGISTRY_AUTH_FILE": str(auth_file("auth.json", "s3cret pass", docker_style=False))}
        pushed = push(reg, busybox_guest, image, "fleet/authed:v1", env=podman)

        assert pull(host, reg.url("fleet/authed:v1"), env=base).returncode != 0
        wrong = {**base, "REGISTRY_AUTH_FILE": str(auth_file("wrong.json", "guessed", docker_style=False))}
        refused = pull(host, reg.url("fleet/authed:v1"), env=wrong)
        assert refused.returncode != 0 and "HTTP 401" in refused.stderr, refused.stderr

        docker = {
            **base,
            "DOCKER_CONFIG": str(auth_file("docker/config.json", "s3cret pass", docker_style=True).parent),
        }
        pulled = pull(host, reg.url("fleet/authed:v1"), env=docker)
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["origin"]["digest"] == pushed["digest"]
        assert any(n.startswith("authed-v1") for n in library_files(host))
