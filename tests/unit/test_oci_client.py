"""OCI client and artifact layout against a fake registry that HAS the referrers API (the test bed's
distribution 2.8 does not): push/pull through the API, the bearer-token flow with credentials from
REGISTRY_AUTH_FILE, references, `--insecure` refusal, and the strict layer reader."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.errors import DigestMismatchError, FormatError, UsageError, VerificationError
from hostguard.host.config import Config
from hostguard.host.oci import MANIFEST_V1, RegistryClient, RegistryError, parse_reference
from hostguard.library import oci, ocilayer, ociunpack
from hostguard.library.pool import Library
from tests.testbed.pki import TestPKI
from tests.testbed.signed import disk_of, make_manifest, sign
from tests.unit.oci_fakes import FakeRegistry

DISK = b"qcow2-ish disk bytes " * 5000


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    reg = FakeRegistry()
    yield reg
    reg.close()


@pytest.fixture
def signed_files(tmp_path: Path, pki: TestPKI) -> tuple[Path, Path]:
    image = tmp_path / "disk.raw"
    image.write_bytes(DISK)
    envelope = tmp_path / "disk.raw.hgsig"
    envelope.write_bytes(sign(make_manifest("fake", 3, disks=[disk_of(DISK)]), [(pki.leaf, [pki.intermediate])]))
    return image, envelope


@pytest.fixture
def library(tmp_path: Path, pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> Library:
    trust = pki.write_trust_dir(tmp_path / "trust")
    doc = {"trust": {"dir": str(trust)}, "state": {"dir": str(tmp_path / "state")}}
    doc["library"] = {"dir": str(tmp_path / "lib")}
    monkeypatch.setattr(Library, "refresh_pool", lambda self: None)  # no libvirtd in unit tests
    monkeypatch.setattr("hostguard.library.pool._set_immutable", lambda path, on: False)
    return Library(Config(doc, tmp_path / "hostguard.toml"))


def test_push_and_pull_through_the_referrers_api(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library
) -> None:
    image, envelope = signed_files
    pushed = oci.push(image, envelope, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    assert pushed["referrers"] == "api"  # OCI-Subject came back: no fallback tag written
    assert "sha256-" not in " ".join(fake.tags["fleet/fake"])
    entry = oci.pull(library, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True, progress=False)
    assert entry["referrers"] == "api" and entry["name"] == "fake-v3"
    assert any("/referrers/" in r for r in fake.requests)
    assert (library.dir / "fake-v3.raw").read_bytes() == DISK
    assert entry["layer_checked_by"] == "signed layout"  # push's own layer: every byte the signature's (ADR 0034)


def test_manifest_whose_bytes_do_not_match_the_digest_is_refused(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library
) -> None:
    image, envelope = signed_files
    pushed = oci.push(image, envelope, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    body, media = fake.manifests[str(pushed["digest"])]
    fake.manifests[str(pushed["digest"])] = (body.replace(b'"schemaVersion":2', b'"schemaVersion": 2'), media)
    ref = parse_reference(f"oci://{fake.host}/fleet/fake@{pushed['digest']}")
    with pytest.raises(FormatError, match="whose digest is"):
        oci.pull(library, ref, insecure=True, progress=False)
    assert library.names() == []


def test_bearer_token_flow_with_credentials_from_registry_auth_file(
    tmp_path: Path, signed_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = FakeRegistry(token_user="alice", token_password="s3cret")
    try:
        target = parse_reference(f"oci://{reg.host}/fleet/fake:v3")
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.docker/config.json
        monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
        with pytest.raises(RegistryError, match="HTTP 401"):
            oci.push(*signed_files, target, insecure=True)
        auth = tmp_path / "auth.json"
        token = base64.b64encode(b"alice:s3cret").decode()
        auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        pushed = oci.push(*signed_files, target, insecure=True)
        assert pushed["referrers"] == "api"
    finally:
        reg.close()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("docker://r/x:1", "an OCI reference is"),
        ("oci://r/UPPER:1", "is not a repository name"),
        ("oci://r/x", "give a tag"),
        ("oci://r/x@sha256:abc", "64 lowercase hex"),
        ("oci://r/x:bad/tag", "is not a repository name"),
    ],
)
def test_bad_references_are_refused(text: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse_reference(text)


def test_references_parse() -> None:
    ref = parse_reference("oci://127.0.0.1:5000/a/b-c:v1.2")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("127.0.0.1:5000", "a/b-c", "v1.2", None)
    d = "sha256:" + "a" * 64
    assert parse_reference(f"oci://r.example:443/a@{d}").ref == d
    assert parse_reference("oci://r/a", bare=True).tag is None


@pytest.mark.parametrize("host", ["registry.example.com", "10.0.0.1:5000", "127.0.0.1.example.com"])
def test_insecure_refused_off_loopback(host: str) -> None:
    with pytest.raises(UsageError, match="only allowed for a loopback registry"):
        RegistryClient(parse_reference(f"oci://{host}/a:1"), insecure=True)


# --- the layer reader ---------------------------------------------------------------------------------------


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes], trailer: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data[m.name]) if m.name in data else None)
    return buf.getvalue() + trailer


def _file(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _unpack(tmp_path: Path, layer: bytes, chunk: int = 777) -> ociunpack.Unpacker:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    u = ociunpack.Unpacker(work)
    for i in range(0, len(layer), chunk):
        u.feed(memoryview(layer[i : i + chunk]))
    u.close()
    u.finish()
    return u


def test_layer_writer_and_reader_agree(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(DISK)
    writer = ocilayer.LayerWriter([("disk/x.qcow2", disk)])
    layer = b"".join(writer.chunks())
    assert writer.digest() == f"sha256:{hashlib.sha256(layer).hexdigest()}"
    u = _unpack(tmp_path, layer)
    assert u.disk_hash.hexdigest() == hashlib.sha256(DISK).hexdigest()
    assert (u.files["image"]).read_bytes() == DISK


def test_disk_is_written_back_as_it_arrives_two_steps_in_flight_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step is started once written and waited for one step later (what the final fsync has left is one
    step), in file offsets: a resumed download continues from where the partial file ends."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(ociunpack, "WRITEBACK_STEP", 8192)
    monkeypatch.setattr(
        ociunpack, "sync_range", lambda fd, offset, length, flags: calls.append((offset, length, flags))
    )
    layer = _tar([_file("disk/x.raw", len(DISK))], {"disk/x.raw": DISK})
    _unpack(tmp_path, layer, chunk=4096)
    started = [(o, n) for o, n, f in calls if f == ociunpack.START_WRITE]
    waited = [(o, n) for o, n, f in calls if f == ociunpack.WAIT_WRITTEN]
    assert started[0][0] == 0 and all(a + n == b for (a, n), (b, _) in itertools.pairwise(started))
    assert waited == started[:-1]  # every step but the last waited for, the one after it was started
    assert started[-1][0] + started[-1][1] > len(DISK) - 2 * 8192  # the fsync has at most a step and a bit

    calls.clear()
    work = tmp_path / "resumed"
    work.mkdir()
    u = ociunpack.Unpacker(work, prefix_out=False)
    header_end = layer.index(DISK[:64])
    u.feed(memoryview(layer[:header_end]))
    have = 3 * 8192 + 100
    (work / "image").write_bytes(DISK[:have])
    u.replay_disk(work / "image", have, lambda _: None)
    rest = layer[header_end + have :]
    for i in range(0, len(rest), 4096):
        u.feed(memoryview(rest[i : i + 4096]))
    u.close()
    u.finish()
    assert (work / "image").read_bytes() == DISK
    assert calls and calls[0][0] == have  # not offset 0, which the previous run already made durable


def test_disk_is_written_in_pieces_and_short_writes_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write(2) carries at most WRITE_PIECE bytes (large writes cost several times the system time), and a
    write that takes fewer bytes than offered is continued, so the file holds exactly what was hashed."""
    sizes: list[int] = []
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        sizes.append(len(data))
        return real_write(fd, data[: max(1, len(data) - 1000)])  # the kernel may take less than offered

    monkeypatch.setattr(ociunpack, "WRITE_PIECE", 4096)
    monkeypatch.setattr(os, "write", short_write)
    layer = _tar([_file("disk/x.raw", len(DISK))], {"disk/x.raw": DISK})
    u = _unpack(tmp_path, layer, chunk=64 * 1024)
    assert (u.files["image"]).read_bytes() == DISK
    assert u.disk_hash.hexdigest() == hashlib.sha256(DISK).hexdigest()
    assert sizes and max(sizes) <= 4096


@pytest.mark.parametrize("attack", ["symlink", "two-disks", "other-path", "traversal", "after-end", "truncated"])
def test_layer_reader_refuses_hostile_layers(tmp_path: Path, attack: str) -> None:
    disk = _file("disk/x.qcow2", 10)
    data = {"disk/x.qcow2": b"0123456789", "disk/y.qcow2": b"0123456789", "etc/passwd": b"0123456789"}
    if attack == "symlink":
        link = tarfile.TarInfo("disk/x.qcow2")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        layer = _tar([link], data)
    elif attack == "two-disks":
        layer = _tar([disk, _file("disk/y.qcow2", 10)], data)
    elif attack == "other-path":
        layer = _tar([disk, _file("etc/passwd", 10)], data)
    elif attack == "traversal":
        data["disk/../x"] = b"0123456789"
        layer = _tar([_file("disk/../x", 10)], data)
    elif attack == "after-end":
        layer = _tar([disk], data, trailer=b"\1" * 512)
    else:
        layer = _tar([disk], data)[:1024]
    with pytest.raises(FormatError):
        _unpack(tmp_path, layer)


def test_unsigned_image_is_refused_before_download(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library
) -> None:
    image, envelope = signed_files
    pushed = oci.push(image, envelope, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    fake.subjects.clear()
    with pytest.raises(VerificationError, match="no hostguard signature"):
        oci.pull(library, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True, progress=False)
    assert not any(str(pushed["layer"]) in r and r.startswith("GET") for r in fake.requests)


def test_layer_larger_than_the_signed_files_is_not_downloaded(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library
) -> None:
    """A registry (or someone who can push to it) that points a signed image at an endless layer: refused from
    the signed sizes before a byte of it is fetched (the signature is re-attached to the altered manifest)."""
    image, envelope = signed_files
    pushed = oci.push(image, envelope, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    _reissue(fake, pushed, size=1 << 40)
    with pytest.raises(FormatError, match="larger than the signed files"):
        oci.pull(library, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True, progress=False)
    assert not any(str(pushed["layer"]) in r for r in fake.requests if r.startswith("GET"))


def _reissue(fake: FakeRegistry, pushed: dict[str, Any], **layer: Any) -> None:
    """A new image manifest for the pushed image with its layer descriptor changed, tagged in its place, and
    the signature re-attached to it (a registry, or someone who can push to it, re-pointing a signed image)."""
    old = str(pushed["digest"])
    doc = json.loads(fake.manifests[old][0])
    doc["layers"][0].update(layer)
    body = json.dumps(doc).encode()
    new = f"sha256:{hashlib.sha256(body).hexdigest()}"
    fake.manifests[new] = (body, MANIFEST_V1)
    fake.tags["fleet/fake"]["v3"] = new
    sig_entry = fake.subjects[old][0]
    sig = json.loads(fake.manifests[sig_entry["digest"]][0])
    sig["subject"] = {"mediaType": MANIFEST_V1, "digest": new, "size": len(body)}
    sig_body = json.dumps(sig).encode()
    sig_digest = f"sha256:{hashlib.sha256(sig_body).hexdigest()}"
    fake.manifests[sig_digest] = (sig_body, MANIFEST_V1)
    fake.subjects[new] = [{**sig_entry, "digest": sig_digest, "size": len(sig_body)}]


def _other_tools_layer(layer: bytes) -> bytes:
    """The same files in a tar of the same size whose disk header differs: an mtime, as another tool writes."""
    at = layer.index(b"disk/fake.img")
    start = at - at % 512
    info = tarfile.TarInfo.frombuf(layer[start : start + 512], "utf-8", "strict")
    info.mtime = 1_700_000_000
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    assert len(header) == 512 and header != layer[start : start + 512]
    return layer[:start] + header + layer[start + 512 :]


@pytest.mark.parametrize("where", ["header field the tar reader ignores", "end-of-archive block", "disk byte"])
def test_a_layer_altered_by_the_registry_is_refused_and_nothing_is_added(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library, where: str
) -> None:
    """Whatever byte the registry alters, the pull fails: a fixed byte of the layout sends the check to the
    layer digest (caught up over what came before), a disk byte fails the signed disk digest."""
    image, envelope = signed_files
    pushed = oci.push(image, envelope, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    layer = bytearray(fake.blobs[str(pushed["layer"])])
    if where == "disk byte":
        layer[layer.index(DISK[:64]) + 5000] ^= 1
    elif where == "end-of-archive block":
        layer[-700] = 1
    else:
        served = _other_tools_layer(bytes(layer))
        layer[:] = served
    fake.blobs[str(pushed["layer"])] = bytes(layer)  # the registry serves other bytes under the layer's name
    with pytest.raises((DigestMismatchError, VerificationError, FormatError)):
        oci.pull(library, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True, progress=False)
    assert library.names() == [] and not oci.pulling_dir(library).exists()
    assert [p.name for p in library.dir.iterdir()] == []


def test_another_tools_layer_for_the_signed_files_is_checked_against_its_digest(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library
) -> None:
    image, envelope = signed_files
    pushed = oci.push(image, envelope, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    other = _other_tools_layer(fake.blobs[str(pushed["layer"])])
    fake.blobs[digest := f"sha256:{hashlib.sha256(other).hexdigest()}"] = other
    _reissue(fake, pushed, digest=digest, size=len(other))
    entry = oci.pull(library, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True, progress=False)
    assert entry["layer_checked_by"] == "layer digest"
    assert (library.dir / "fake-v3.raw").read_bytes() == DISK


@pytest.mark.parametrize("ranges", [True, False])
def test_interrupted_pull_resumes_with_range_or_restarts_without(
    signed_files: tuple[Path, Path], library: Library, ranges: bool
) -> None:
    from tests.testbed.registry import CuttingProxy

    reg = FakeRegistry(ranges=ranges)
    try:
        pushed = oci.push(*signed_files, parse_reference(f"oci://{reg.host}/fleet/fake:v3"), insecure=True)
        port = int(reg.host.rsplit(":", 1)[1])
        proxy = CuttingProxy(port, int(str(pushed["layer_size"])) // 2)
        with proxy, pytest.raises(RegistryError, match="pull again to resume"):
            oci.pull(library, parse_reference(f"oci://{proxy.host}/fleet/fake:v3"), insecure=True, progress=False)
        assert library.names() == []
        assert list(oci.pulling_dir(library).iterdir())  # kept for the next run
        assert library.dir not in oci.pulling_dir(library).parents  # not in the libvirt pool's directory
        assert [p.name for p in library.dir.iterdir() if p.name.startswith(".")] == []
        entry = oci.pull(library, parse_reference(f"oci://{reg.host}/fleet/fake:v3"), insecure=True, progress=False)
        assert (entry["resumed_from"] > 0) is ranges
        assert (library.dir / "fake-v3.raw").read_bytes() == DISK
        assert not oci.pulling_dir(library).exists()
    finally:
        reg.close()


def test_partial_download_with_wrong_bytes_is_discarded_and_never_admitted(
    fake: FakeRegistry, signed_files: tuple[Path, Path], library: Library
) -> None:
    """A partial disk altered between runs: the resume re-hashes it, the layer digest fails, nothing is added
    and the partial files are deleted (the next pull starts from scratch)."""
    from tests.testbed.registry import CuttingProxy

    pushed = oci.push(*signed_files, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True)
    port = int(fake.host.rsplit(":", 1)[1])
    with CuttingProxy(port, int(str(pushed["layer_size"])) // 2) as proxy, pytest.raises(RegistryError):
        oci.pull(library, parse_reference(f"oci://{proxy.host}/fleet/fake:v3"), insecure=True, progress=False)
    (partial,) = oci.pulling_dir(library).iterdir()
    with (partial / "image").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"X")
    with pytest.raises(DigestMismatchError):
        oci.pull(library, parse_reference(f"oci://{fake.host}/fleet/fake:v3"), insecure=True, progress=False)
    assert library.names() == [] and not partial.exists()


def test_credentials_from_auth_files_and_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hostguard.host.oci import credentials

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"https://reg.example": {"username": "bob", "password": "pw"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    assert credentials("reg.example") == ("bob", "pw")
    assert credentials("other.example") is None
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread host\necho "{\\"Username\\": \\"u-$host\\", \\"Secret\\": \\"s\\"}"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    auth.write_text(json.dumps({"credHelpers": {"reg.example": "fake"}}))
    assert credentials("reg.example") == ("u-reg.example", "s")
    auth.write_text("not json")
    with pytest.raises(UsageError, match="cannot read the registry auth file"):
        credentials("reg.example")


def test_credentials_are_not_sent_to_a_plain_http_token_realm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry (or a man in the middle of plain HTTP) that names an http:// realm elsewhere must not get the
    user's password."""
    from hostguard.host.oci import _Transport

    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"reg.example": {"auth": base64.b64encode(b"bob:pw").decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    transport = _Transport("reg.example", insecure=False, timeout=5)
    with pytest.raises(RegistryError, match="refusing to send credentials"):
        transport._authenticate('Bearer realm="http://tokens.example/token",service="reg"')
