"""Issue 22 (items 2, 7, 8, 10, 11, 12, 14) and issue 14 (item 3 and its hardening), one attack per test, each
through `hostguard verify` (cli.main, exactly as the command line runs it) or `verify_files`."""

from __future__ import annotations

import datetime as dt
import json
import mmap
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from hostguard.cli import main
from hostguard.errors import ConfigError, FormatError, UsageError
from hostguard.host import digest
from hostguard.host.config import load_config
from hostguard.host.verify_files import MAX_ENVELOPE_FILE, read_envelope
from hostguard.signed.envelope import MAX_ENVELOPE_BYTES
from hostguard.signed.manifest import format_time
from tests.testbed.pki import DAY, NOW, Identity, TestPKI, issue, make_crl
from tests.testbed.signed import disk_of, make_manifest, sign

NOBODY = 65534
IMAGE = b"\x00" * 8192 + b"signed guest"


class Host:
    """A trust directory, a signed raw image and a state directory, as `hostguard verify` uses them."""

    def __init__(self, tmp: Path, pki: TestPKI) -> None:
        self.tmp, self.pki = tmp, pki
        self.trust = pki.write_trust_dir(tmp / "trust")
        self.state = tmp / "state"
        self.image = tmp / "images" / "disk.raw"
        self.image.parent.mkdir()
        self.image.write_bytes(IMAGE)
        self.envelope = tmp / "disk.raw.hgsig"
        self.sign([(pki.leaf, [pki.intermediate])])

    def sign(self, signers: Sequence[tuple[Identity, Sequence[Identity]]], **manifest: object) -> Path:
        self.envelope.write_bytes(sign(make_manifest(disks=[disk_of(IMAGE)], **manifest), signers))  # type: ignore[arg-type]
        return self.envelope

    def verify(self, *extra: str, state: Path | None = None, at: dt.datetime | None = None) -> int:
        argv = ["verify", str(self.envelope), "--trust", str(self.trust), "--image", str(self.image), *extra]
        if state is not None:
            argv += ["--state", str(state)]
        if at is not None:
            argv += ["--at", format_time(at)]
        return main(argv)

    def verify_json(self, capsys: pytest.CaptureFixture[str], **kw: object) -> tuple[int, dict[str, object]]:
        capsys.readouterr()
        code = self.verify("--json", **kw)  # type: ignore[arg-type]
        return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def host(tmp_path: Path, pki: TestPKI) -> Host:
    return Host(tmp_path, pki)


def disk_cached(doc: dict[str, object]) -> bool:
    disks = doc["disks"]
    assert isinstance(disks, list) and len(disks) == 1
    return bool(disks[0]["cached"])


# --- 22/2: the cache window comes from what the answer depends on --------------------------------------------


def _twice_certified(pki: TestPKI, cn: str, until: dt.datetime) -> tuple[Identity, Identity]:
    """One key in two certificates: the one the policy authorises ends at `until`, a renewal (another CN,
    not authorised) runs a year longer."""
    short = issue(cn, issuer=pki.intermediate, not_after=until)
    renewal = issue(f"{cn}-renewed", issuer=pki.intermediate, key=short.key, not_after=NOW + 400 * DAY)
    return short, renewal


@pytest.mark.parametrize("loss", ["expiry", "threshold", "stale crl"])
def test_cached_allow_does_not_outlive_the_signature_that_satisfied_the_policy(
    host: Host, pki: TestPKI, loss: str
) -> None:
    t1 = NOW + 10 * DAY
    short, renewal = _twice_certified(pki, "acme-build", t1)
    signers = [(short, [pki.intermediate]), (renewal, [pki.intermediate])]
    toml = '[[signer]]\ncn = "acme-build"\nimages = "*"\n[[signer]]\ncn = "second-build"\nimages = "*"\n'
    if loss == "threshold":
        second = pki.leaf_variant("second-build")
        signers.append((second, [pki.intermediate]))
        toml += '[[threshold]]\nimages = "*"\nsigners = 2\n'
    if loss == "stale crl":
        # The authorised certificate stays valid, but its CA's CRL goes stale at t1; the renewal comes from
        # another CA (no CRL), so a window taken from the renewal's chain would not see the CRL at all.
        other_ca = issue("second intermediate", issuer=pki.root, ca=True, path_length=0, key_cert_sign=True)
        short = issue("acme-build", issuer=pki.intermediate, not_after=NOW + 300 * DAY)
        renewal = issue("acme-build-renewed", issuer=other_ca, key=short.key, not_after=NOW + 400 * DAY)
        signers = [(short, [pki.intermediate]), (renewal, [other_ca])]
        (host.trust / "crls").mkdir()
        crl = make_crl(pki.intermediate, last_update=NOW - DAY, next_update=t1)
        (host.trust / "crls" / "ca.pem").write_bytes(crl.public_bytes(Encoding.PEM))
    (host.trust / "signers.toml").write_text(toml)
    host.sign(signers)
    at_first, after = NOW + DAY, t1 + DAY
    assert host.verify(state=host.state, at=at_first) == 0
    full = host.verify(at=after)  # no state: a full verification
    assert full == 1
    assert host.verify(state=host.state, at=after) == full


# --- 22/7 and 14/3: a cached digest only where the file's identity cannot lie -------------------------------


@pytest.fixture
def writable_mapping(host: Host) -> Iterator[mmap.mmap]:
    fd = os.open(host.image, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, len(IMAGE), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        yield mapping
    finally:
        mapping.close()


def test_a_store_through_a_shared_writable_mmap_keeps_mtime_and_ctime(host: Host, writable_mapping: mmap.mmap) -> None:
    """The kernel behaviour the attack below rests on, measured here rather than assumed."""
    writable_mapping[0:1] = b"\x01"  # the first store dirties the page (and updates the times)
    before = os.stat(host.image)
    writable_mapping[1:2] = b"\x02"  # a store into the dirty page
    after = os.stat(host.image)
    assert host.image.read_bytes()[1] == 2
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    writable_mapping[0:2] = b"\x00\x00"


def test_digest_cache_poisoned_through_a_dirty_mmap_page_is_not_used(
    host: Host, writable_mapping: mmap.mmap, capsys: pytest.CaptureFixture[str]
) -> None:
    writable_mapping[0:1] = b"\x00"  # dirty the page, content still the signed bytes
    code, doc = host.verify_json(capsys, state=host.state)
    assert code == 0 and not disk_cached(doc)
    stat_before = os.stat(host.image)
    writable_mapping[100:104] = b"evil"  # same page: mtime and ctime stay
    assert os.stat(host.image).st_ctime_ns == stat_before.st_ctime_ns
    assert host.verify(state=host.state) == 1  # hashed again: the changed bytes are denied


def test_a_root_owned_image_with_no_writer_is_served_from_the_cache(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    assert host.verify(state=host.state) == 0
    code, doc = host.verify_json(capsys, state=host.state)
    assert code == 0 and disk_cached(doc)


def test_digest_cache_of_an_image_a_user_can_write_is_not_used(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    os.chown(host.image, NOBODY, NOBODY)  # what libvirt's dynamic ownership does while a domain runs
    for _ in range(2):
        code, doc = host.verify_json(capsys, state=host.state)
        assert code == 0 and not disk_cached(doc)
    os.chown(host.image, 0, 0)
    os.chmod(host.image, 0o666)
    code, doc = host.verify_json(capsys, state=host.state)
    assert code == 0 and not disk_cached(doc)


def test_digest_cache_in_a_directory_a_user_can_write_is_not_used(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chown(host.image.parent, NOBODY, NOBODY)
    for _ in range(2):
        code, doc = host.verify_json(capsys, state=host.state)
        assert code == 0 and not disk_cached(doc)


@pytest.mark.parametrize("fstype", ["fuse.sshfs", "nfs4", "ceph", "overlay"])
def test_digest_cache_on_storage_that_reports_identity_itself_is_not_used(
    host: Host, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fstype: str
) -> None:
    # No FUSE or NFS mount in the unit lane: the file system type is what the mount table would say.
    monkeypatch.setattr(digest, "filesystem_type", lambda fd: fstype)
    for _ in range(2):
        code, doc = host.verify_json(capsys, state=host.state)
        assert code == 0 and not disk_cached(doc)


def test_an_immutable_image_keeps_the_fast_path_whoever_owns_it(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    os.chown(host.image, NOBODY, NOBODY)
    if subprocess.run(["chattr", "+i", str(host.image)], capture_output=True, check=False).returncode != 0:
        pytest.fail("chattr +i failed: the test needs root on a file system with the immutable flag")
    try:
        assert host.verify(state=host.state) == 0
        code, doc = host.verify_json(capsys, state=host.state)
        assert code == 0 and disk_cached(doc)
    finally:
        subprocess.run(["chattr", "-i", str(host.image)], check=True)


# --- 22/8: verdicts of another verifier are never read -------------------------------------------------------


def test_a_verdict_cached_by_another_cryptography_is_not_used(
    host: Host, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert host.verify(state=host.state) == 0
    code, doc = host.verify_json(capsys, state=host.state)
    assert code == 0 and doc["cached_verdict"] is True
    # An upgraded cryptography first on the path (the imported module stays: only the identity changes).
    fake = tmp_path / "site" / "cryptography"
    (fake / "hazmat" / "bindings").mkdir(parents=True)
    (fake / "__about__.py").write_text('__version__ = "99.0.0"\n')
    (fake / "hazmat" / "bindings" / "_rust.abi3.so").write_bytes(b"new core")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    code, doc = host.verify_json(capsys, state=host.state)
    assert code == 0 and doc["cached_verdict"] is False


def test_a_verdict_cached_by_another_hostguard_is_not_used(
    host: Host, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hostguard.host import verify_files

    assert host.verify(state=host.state) == 0
    monkeypatch.setattr(verify_files, "__version__", "0.0.0-fixed")
    code, doc = host.verify_json(capsys, state=host.state)
    assert code == 0 and doc["cached_verdict"] is False


# --- 22/10 and the hardening of issue 14: only root may be able to change what hostguard trusts -----------


def test_a_trust_directory_owned_by_a_user_is_refused(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    os.chown(host.trust / "roots", NOBODY, NOBODY)
    capsys.readouterr()
    assert host.verify() == 2
    assert "owned by uid 65534" in capsys.readouterr().err


def test_a_trust_root_symlinked_to_a_user_s_file_is_refused(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "home"
    users.mkdir()
    planted = users / "root.pem"
    planted.write_bytes((host.trust / "roots" / "root.pem").read_bytes())
    os.chown(users, NOBODY, NOBODY)
    os.chown(planted, NOBODY, NOBODY)
    (host.trust / "roots" / "root.pem").unlink()
    (host.trust / "roots" / "root.pem").symlink_to(planted)
    capsys.readouterr()
    assert host.verify() == 2
    assert "owned by uid 65534" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["owner", "group-writable", "parent"])
def test_a_state_directory_a_user_could_forge_verdicts_in_is_refused(
    host: Host, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    state = host.tmp / "outer" / "state"
    state.mkdir(parents=True, mode=0o700)
    assert host.verify(state=state) == 0
    if how == "owner":
        os.chown(state, NOBODY, NOBODY)
    elif how == "group-writable":
        os.chmod(state, 0o770)
    else:
        os.chown(state.parent, NOBODY, NOBODY)
    capsys.readouterr()
    assert host.verify(state=state) == 2
    assert "state directory" in capsys.readouterr().err


def test_a_verdict_row_in_a_database_file_a_user_owns_is_refused(host: Host) -> None:
    assert host.verify(state=host.state) == 0
    os.chown(host.state / "state.db", NOBODY, NOBODY)
    assert host.verify(state=host.state) == 2


@pytest.mark.parametrize("how", ["file", "directory"])
def test_a_configuration_a_user_can_write_is_refused(tmp_path: Path, how: str) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    conf = conf_dir / "hostguard.toml"
    conf.write_text('[trust]\ndir = "/etc/hostguard/trust"\n')
    load_config(conf)
    os.chown(conf if how == "file" else conf_dir, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="configuration file"):
        load_config(conf)


# --- 22/11 and 22/14: the envelope file ------------------------------------------------------------------


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail (SIGALRM) rather than hang forever, which is what the attack did."""

    def timeout(*_: object) -> None:
        raise TimeoutError("blocked on the envelope")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_envelope_that_is_a_fifo_is_refused_without_blocking(
    host: Host, alarm: None, capsys: pytest.CaptureFixture[str]
) -> None:
    host.envelope.unlink()
    os.mkfifo(host.envelope)
    capsys.readouterr()
    assert host.verify(state=host.state) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_the_daemon_s_re_verification_refuses_a_fifo_without_blocking(host: Host, alarm: None) -> None:
    from hostguard.host.config import Config
    from hostguard.poststart.reverify import load_verified_manifest

    host.envelope.unlink()
    os.mkfifo(host.envelope)
    config = Config({"trust": {"dir": str(host.trust)}, "state": {"dir": str(host.state)}}, host.tmp / "c.toml")
    with pytest.raises(FormatError, match="not a regular file"):
        load_verified_manifest(config, host.envelope)


def test_an_envelope_symlink_is_refused(host: Host) -> None:
    link = host.tmp / "link.hgsig"
    link.symlink_to(host.envelope)
    with pytest.raises(UsageError, match="symlink"):
        read_envelope(link)


def test_an_oversized_envelope_is_refused_before_it_is_read(host: Host, alarm: None) -> None:
    assert MAX_ENVELOPE_FILE == MAX_ENVELOPE_BYTES  # the one documented limit
    with open(host.envelope, "r+b") as fh:
        fh.truncate(MAX_ENVELOPE_FILE + 1)  # sparse: reading it would take time and memory
    assert host.verify() == 1


def test_a_rejected_envelope_at_the_size_limit_costs_little(host: Host, pki: TestPKI) -> None:
    """92 MiB of forged payload under a genuine certificate cost ~4.8 s before; the bound is now ~1.3 s here."""
    import base64
    import time

    doc = json.loads(host.envelope.read_bytes())
    doc["payload"] = base64.b64encode(os.urandom(3 * (MAX_ENVELOPE_FILE // 4) - 4096)).decode()
    host.envelope.write_text(json.dumps(doc))
    start = time.monotonic()
    assert host.verify() == 1
    assert time.monotonic() - start < 4.0


# --- 22/12: inputs that used to raise a traceback -----------------------------------------------------------


def test_a_lone_surrogate_in_the_image_name_is_one_line(
    host: Host, pki: TestPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = make_manifest(name="web\ud800", disks=[disk_of(IMAGE)])
    payload = json.dumps(manifest.to_json()).encode()  # JSON spells the lone surrogate as the escape \ud800
    host.envelope.write_bytes(sign(payload, [(pki.leaf, [pki.intermediate])]))
    capsys.readouterr()
    assert host.verify(state=host.state) == 1
    err = capsys.readouterr().err
    assert err.startswith("denied:") and err.count("\n") == 1 and "not valid Unicode" in err


def test_a_manifest_created_in_year_one_is_one_line(
    host: Host, pki: TestPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = make_manifest(disks=[disk_of(IMAGE)]).to_json()
    doc["created"] = "0001-01-01T00:00:00Z"
    host.envelope.write_bytes(sign(json.dumps(doc).encode(), [(pki.leaf, [pki.intermediate])]))
    capsys.readouterr()
    assert host.verify(state=host.state) == 0
    assert host.verify(state=host.state) == 0  # and from the cache
    assert capsys.readouterr().err.count("\n") == 2


@pytest.mark.parametrize("which", ["trust", "state"])
def test_a_configuration_naming_a_directory_a_user_owns_is_refused_at_load(tmp_path: Path, which: str) -> None:
    (tmp_path / "trust").mkdir()
    (tmp_path / "state").mkdir()
    conf = tmp_path / "hostguard.toml"
    conf.write_text(f'[trust]\ndir = "{tmp_path / "trust"}"\n[state]\ndir = "{tmp_path / "state"}"\n')
    load_config(conf)
    os.chown(tmp_path / which, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"{which} directory"):
        load_config(conf)  # what the hook and the daemon call at start


# --- the same through the hook's decision (hostguard.preboot.decide) ------------------------------------------


def test_the_hook_does_not_start_a_base_image_poisoned_through_a_dirty_mmap_page(tmp_path: Path, pki: TestPKI) -> None:
    from hostguard.errors import VerificationError
    from tests.unit.test_preboot import Host as HookHost

    hook = HookHost(tmp_path, pki)
    fd = os.open(hook.base, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        mapping[-1:] = mapping[-1:]  # dirty the last page; the bytes are still the signed ones
        hook.decide(hook.xml(hook.base))
        mapping[-4:] = b"evil"  # the same page: mtime and ctime stay
        with pytest.raises(VerificationError, match="not a disk of web v1"):
            hook.decide(hook.xml(hook.base))
    finally:
        mapping.close()


def test_the_hook_refuses_a_state_directory_a_user_owns(tmp_path: Path, pki: TestPKI) -> None:
    from tests.unit.test_preboot import Host as HookHost

    hook = HookHost(tmp_path, pki)
    hook.decide(hook.xml(hook.base))
    os.chown(hook.state, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="state directory"):
        hook.decide(hook.xml(hook.base))


def test_release_end_rewarm_does_not_cache_a_kernel_someone_holds_a_writable_mapping_of(
    tmp_path: Path, pki: TestPKI
) -> None:
    from hostguard.errors import VerificationError
    from hostguard.host.statedir import save_domain_record
    from hostguard.preboot.decide import rewarm_digests
    from tests.unit.test_preboot import Host as HookHost

    hook = HookHost(tmp_path, pki)
    xml = hook.xml(hook.overlay())
    save_domain_record(hook.state, hook.decide(xml).domain_record())
    fd = os.open(hook.kernel, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        mapping[0:1] = mapping[0:1]  # a QEMU-era writer keeps its dirty page across the stop
        os.utime(hook.kernel)  # new ctime, as libvirt's relabelling at stop gives it
        rewarm_digests(hook.config(), xml)  # hashed, but with a writer present: not cached
        mapping[0:4] = b"evil"
        with pytest.raises(VerificationError, match="kernel does not match"):
            hook.decide(xml)
    finally:
        mapping.close()
