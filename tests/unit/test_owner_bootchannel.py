"""The host's boot channel on libvirt's test:///default driver: definition edits, K handling, collection."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostguard.errors import DomainError, FormatError, UsageError
from hostguard.owner import bootchannel as bc
from hostguard.owner import collector
from hostguard.owner.hookrule import is_bootchannel_fwcfg
from hostguard.owner.names import FWCFG_NAME
from hostguard.owner.protocol import ChannelError
from hostguard.owner.tokens import Announcement, BootToken, Secret, parse_query
from tests.testbed.prereq import require_module

libvirt = require_module("libvirt")

H = "sha256:" + "cd" * 32
BASE = b"""<domain type='test'><name>NAME</name><memory>65536</memory>
<os><type>hvm</type></os><devices><channel type='pty'><target type='virtio' name='org.other.0'/></channel></devices>
</domain>"""


@pytest.fixture
def conn() -> Iterator[Any]:
    """test:///default is shared by the whole process: each test uses its own names and removes its domains."""
    c = libvirt.open("test:///default")
    before = {d.UUIDString() for d in c.listAllDomains()}
    yield c
    for dom in c.listAllDomains():
        if dom.UUIDString() not in before:
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefine()
    c.close()


@pytest.fixture
def name() -> str:
    return f"hgbc-{secrets.token_hex(4)}"


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[bc.Paths]:
    short = Path(tempfile.mkdtemp(prefix="hgbc-", dir="/tmp"))  # unix socket paths must stay under 108 bytes
    yield bc.Paths(short / "run", tmp_path / "state")
    shutil.rmtree(short)


def _define(conn: Any, name: str, xml: bytes = BASE) -> Any:
    return conn.defineXML(xml.replace(b"NAME", name.encode()).decode())


def _inactive(dom: Any) -> str:
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def _leaks(secret_text: str, roots: list[Path]) -> list[Path]:
    """Files under `roots` that contain K (any file: records, sockets' dirs, logs)."""
    found = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink() and secret_text.encode() in p.read_bytes():
                    found.append(p)
    return found


# --- XML transforms ---------------------------------------------------------------------------------------------


def test_attach_xml_then_remove_restores_the_original_elements() -> None:
    xml = BASE.replace(b"NAME", b"x")
    added = bc.add_bootchannel(
        xml, BootToken("no-secrets", H), key_file=None, boot_socket=Path("/r/b.sock"), owner_socket=Path("/r/o.sock")
    )
    assert f"hgowner1:no-secrets:{H}".encode() in added
    assert b'<smbios mode="sysinfo"/>' in added and b"fwcfg" not in added
    assert bc.channel_socket(added, "org.hostguard.boot.0") == Path("/r/b.sock")
    assert bc.channel_socket(added, "org.hostguard.owner.0") == Path("/r/o.sock")
    again = bc.add_bootchannel(  # idempotent: one token, one pair of channels
        added, BootToken("no-secrets", H), key_file=None, boot_socket=Path("/r/b.sock"), owner_socket=Path("/r/o.sock")
    )
    assert again.count(b"hgowner1:") == 1 and again.count(b"org.hostguard.boot.0") == 1
    removed = bc.remove_bootchannel(again)
    for gone in (b"hgowner1", b"smbios", b"sysinfo", b"org.hostguard", b"bootchannel"):
        assert gone not in removed
    assert b"org.other.0" in removed  # other channels are left alone


def test_existing_oem_strings_and_smbios_mode_are_kept() -> None:
    xml = (
        BASE.replace(b"NAME", b"x")
        .replace(b"<os>", b"<sysinfo type='smbios'><oemStrings><entry>vendor:1</entry></oemStrings></sysinfo><os>")
        .replace(b"<type>hvm</type>", b"<type>hvm</type><smbios mode='sysinfo'/>")
    )
    added = bc.add_bootchannel(
        xml, BootToken("shared-secret", None), key_file=Path("/r/u.k"), boot_socket=Path("/b"), owner_socket=Path("/o")
    )
    assert added.count(b"<smbios") == 1
    removed = bc.remove_bootchannel(added)
    assert b"vendor:1" in removed and b"hgowner1" not in removed
    assert b'<smbios mode="sysinfo"/>' in removed  # it was there before: not ours to remove


def test_smbios_mode_host_is_not_silently_overridden() -> None:
    xml = BASE.replace(b"<type>hvm</type>", b"<type>hvm</type><smbios mode='host'/>")
    with pytest.raises(UsageError, match="mode='host'"):
        bc.add_bootchannel(
            xml, BootToken("no-secrets", H), key_file=None, boot_socket=Path("/b"), owner_socket=Path("/o")
        )


def test_secret_is_referenced_by_file_never_inline() -> None:
    added = bc.add_bootchannel(
        BASE,
        BootToken("shared-secret", None),
        key_file=Path("/run/x/u.k"),
        boot_socket=Path("/b"),
        owner_socket=Path("/o"),
    )
    assert f'name="{FWCFG_NAME}" file="/run/x/u.k"'.encode() in added
    without = bc.remove_secret_entry(added)
    assert b"fwcfg" not in without and b"hgowner1:shared-secret" in without


@pytest.mark.parametrize(
    "xml",
    [b"<!DOCTYPE x [<!ENTITY a 'b'>]><domain/>", b"<notdomain/>", b"<domain>", b"x" * (bc.MAX_XML + 1)],
)
def test_hostile_xml_is_refused(xml: bytes) -> None:
    with pytest.raises(DomainError):
        bc.parse_xml(xml)


def test_metadata_carries_no_secret() -> None:
    k = Secret.generate()
    record = {"protocol": "shared-secret", "k_check": k.check(), "k_status": "pending", "smbios_added": True}
    xml = bc.metadata_xml(record)
    assert k.encode()[5:-1].decode() not in xml and k.check() not in xml
    assert 'protocol="shared-secret"' in xml and 'smbios-added="yes"' in xml


# --- files --------------------------------------------------------------------------------------------------------


def test_key_file_is_root_only_and_shred_removes_it(paths: bc.Paths) -> None:
    bc.ensure_run_dir(paths.run_dir)
    assert stat.S_IMODE(paths.run_dir.stat().st_mode) == 0o711
    k = Secret.generate()
    path = paths.key_file("u")
    bc.write_key_file(path, k)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert Secret.parse(path.read_bytes()).check() == k.check()
    assert is_bootchannel_fwcfg(FWCFG_NAME, str(path), str(paths.run_dir))
    assert not is_bootchannel_fwcfg("opt/other", str(path), str(paths.run_dir))
    assert not is_bootchannel_fwcfg(FWCFG_NAME, "/etc/shadow", str(paths.run_dir))
    os.chmod(path, 0o644)
    assert not is_bootchannel_fwcfg(FWCFG_NAME, str(path), str(paths.run_dir))
    assert bc.shred(path) and not path.exists() and not bc.shred(path)


def test_key_file_does_not_follow_symlinks(paths: bc.Paths, tmp_path: Path) -> None:
    bc.ensure_run_dir(paths.run_dir)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = paths.key_file("u")
    link.symlink_to(victim)
    assert not is_bootchannel_fwcfg(FWCFG_NAME, str(link), str(paths.run_dir))
    with pytest.raises(OSError):
        bc.shred(link)  # O_NOFOLLOW: the target is never overwritten
    assert victim.read_text() == "keep"


# --- attach / detach through libvirt --------------------------------------------------------------------------


def test_attach_shared_secret_keeps_k_out_of_xml_records_and_world_readable_files(
    conn: Any, paths: bc.Paths, name: str
) -> None:
    dom = _define(conn, name)
    result = bc.attach(conn, name, "shared-secret", paths)
    assert result.secret is not None and not result.running
    k_text = result.secret.encode()[5:-1].decode()
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE, libvirt.VIR_DOMAIN_XML_SECURE):
        assert k_text not in dom.XMLDesc(flags)
    assert "hgowner1:shared-secret" in _inactive(dom)
    assert _leaks(k_text, [paths.state_dir]) == []
    assert _leaks(k_text, [paths.run_dir]) == [paths.key_file(dom.UUIDString())]
    for dirpath, _, files in os.walk(paths.run_dir.parent):
        for f in files:
            mode = stat.S_IMODE((Path(dirpath) / f).stat().st_mode)
            assert not mode & 0o077, f"{f} is readable by others"
    record = bc.load_record(paths, dom.UUIDString())
    assert record is not None and record["k_check"] == result.secret.check() and record["k_status"] == "pending"


def test_attach_no_secrets_needs_the_owner_key_and_writes_no_k(conn: Any, paths: bc.Paths, name: str) -> None:
    dom = _define(conn, name)
    with pytest.raises(UsageError):
        bc.attach(conn, name, "no-secrets", paths)
    with pytest.raises(FormatError):
        bc.attach(conn, name, "no-secrets", paths, owner_key="sha256:nothex")
    with pytest.raises(UsageError):
        bc.attach(conn, name, "shared-secret", paths, owner_key=H)
    result = bc.attach(conn, name, "no-secrets", paths, owner_key=H)
    assert result.secret is None and not paths.key_file(dom.UUIDString()).exists()
    assert f"hgowner1:no-secrets:{H}" in _inactive(dom)


def test_reattach_with_another_protocol_shreds_the_old_k(conn: Any, paths: bc.Paths, name: str) -> None:
    dom = _define(conn, name)
    bc.attach(conn, name, "shared-secret", paths)
    assert paths.key_file(dom.UUIDString()).exists()
    bc.attach(conn, name, "no-secrets", paths, owner_key=H)
    assert not paths.key_file(dom.UUIDString()).exists()
    assert "fwcfg" not in _inactive(dom) and _inactive(dom).count("hgowner1:") == 1


def test_detach_removes_everything_and_shreds_k(conn: Any, paths: bc.Paths, name: str) -> None:
    dom = _define(conn, name)
    bc.attach(conn, name, "shared-secret", paths)
    assert bc.detach(conn, name, paths)
    xml = _inactive(dom)
    for gone in ("hgowner1", "sysinfo", "org.hostguard", "bootchannel", "smbios"):
        assert gone not in xml
    assert not paths.key_file(dom.UUIDString()).exists() and bc.load_record(paths, dom.UUIDString()) is None


def test_transient_domain_is_refused(conn: Any, paths: bc.Paths, name: str) -> None:
    conn.createXML(BASE.replace(b"NAME", name.encode()).decode())
    with pytest.raises(UsageError, match="transient"):
        bc.attach(conn, name, "shared-secret", paths)


def test_sweep_shreds_k_of_undefined_domains(conn: Any, paths: bc.Paths, name: str) -> None:
    dom = _define(conn, name)
    bc.attach(conn, name, "shared-secret", paths)
    keep = _define(conn, name + "-db")
    bc.attach(conn, name + "-db", "shared-secret", paths)
    uuid = dom.UUIDString()
    dom.undefine()
    assert bc.forget_undefined(conn, paths) == [uuid]
    assert not paths.key_file(uuid).exists() and paths.key_file(keep.UUIDString()).exists()


# --- collection over the return channel ------------------------------------------------------------------------


class FakeAgent:
    """Listens on the boot socket like QEMU's chardev; answers queries with `respond(nonce) -> bytes`."""

    def __init__(self, path: Path, respond: Callable[[str], bytes]) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.respond = respond
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                if b"\n" in buf:
                    with contextlib.suppress(OSError):
                        conn.sendall(self.respond(parse_query(buf.split(b"\n")[0] + b"\n")))

    def close(self) -> None:
        self.server.close()


def _running_attached(
    conn: Any, paths: bc.Paths, name: str, protocol: str = "shared-secret"
) -> tuple[Any, bc.Attached]:
    dom = _define(conn, name)
    result = bc.attach(conn, name, protocol, paths, owner_key=H if protocol == "no-secrets" else None)
    dom.create()
    return dom, result


def test_collect_records_the_vm_key_and_shreds_k_once_the_guest_read_it(conn: Any, paths: bc.Paths, name: str) -> None:
    dom, result = _running_attached(conn, paths, name)
    assert result.secret is not None
    vm_key = "sha256:" + "ef" * 32
    agent = FakeAgent(
        paths.boot_socket(dom.UUIDString()),
        lambda n: Announcement(n, "shared-secret", "unpaired", vm_key, None, result.secret.check(), None).to_line(),  # type: ignore[union-attr]
    )
    audit = paths.state_dir / "audit.jsonl"
    try:
        got = collector.collect(conn, name, paths, timeout=5, audit_log=audit)
    finally:
        agent.close()
    assert got.secret_shredded and not paths.key_file(dom.UUIDString()).exists()
    assert "fwcfg" not in _inactive(dom)  # the next start needs no K file
    assert got.record["k_status"] == "shredded" and got.record["announcement"]["vm_key"] == vm_key
    assert f'vm-key="{vm_key}"' in dom.XMLDesc(0)
    k_text = result.secret.encode()[5:-1].decode()
    assert _leaks(k_text, [paths.state_dir, paths.run_dir]) == []
    assert k_text not in audit.read_text() and '"bootchannel-collect"' in audit.read_text()


def test_collect_keeps_k_when_the_guest_read_a_different_one(conn: Any, paths: bc.Paths, name: str) -> None:
    dom, _ = _running_attached(conn, paths, name)
    other = Secret.generate().check()
    agent = FakeAgent(
        paths.boot_socket(dom.UUIDString()),
        lambda n: Announcement(n, "shared-secret", "unpaired", H, None, other, None).to_line(),
    )
    try:
        got = collector.collect(conn, name, paths, timeout=5)
    finally:
        agent.close()
    assert not got.secret_shredded and paths.key_file(dom.UUIDString()).exists()
    assert got.record["k_status"] == "pending" and "different K" in got.record["k_note"]


@pytest.mark.parametrize(
    "respond",
    [
        lambda n: b"x" * 5000,  # oversized, no newline
        lambda n: b"{not json}\n",
        lambda n: Announcement("0" * 32, "no-secrets", "unpaired", H).to_line() * 9,  # never our nonce
        lambda n: b'{"v":1,"type":"announce","nonce":"' + n.encode() + b'","vm_key":"sha256:zz"}\n',
    ],
)
def test_malformed_announcements_are_rejected(
    conn: Any, paths: bc.Paths, name: str, respond: Callable[[str], bytes]
) -> None:
    dom, _ = _running_attached(conn, paths, name, "no-secrets")
    agent = FakeAgent(paths.boot_socket(dom.UUIDString()), respond)
    try:
        with pytest.raises((FormatError, ChannelError)):
            collector._query_once(paths.boot_socket(dom.UUIDString()), 3)
    finally:
        agent.close()
    record = bc.load_record(paths, dom.UUIDString())
    assert record is not None and record["announcement"] is None


def test_silent_guest_times_out(conn: Any, paths: bc.Paths, name: str) -> None:
    dom, _ = _running_attached(conn, paths, name, "no-secrets")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(paths.boot_socket(dom.UUIDString())))
    server.listen(8)  # accepts (in the backlog) but never answers: a guest without agent
    try:
        with pytest.raises(ChannelError, match="no announcement"):
            collector.collect(conn, name, paths, timeout=1.5)
    finally:
        server.close()


def test_collect_needs_a_running_attached_domain(conn: Any, paths: bc.Paths, name: str) -> None:
    _define(conn, name)
    with pytest.raises(Exception, match="not running"):
        collector.collect(conn, name, paths, timeout=1)
    dom = conn.lookupByName(name)
    dom.create()
    with pytest.raises(Exception, match="no boot channel"):
        collector.collect(conn, name, paths, timeout=1)


def test_show_prints_no_commitment_to_k_neither_the_hosts_nor_the_guests(
    conn: Any, paths: bc.Paths, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`bootchannel show` (text and --json) leaves out `k_check` everywhere; the record keeps it (0600)."""
    import argparse
    import json

    from hostguard import cli
    from hostguard.commands.owner_cmd import add_subcommands

    dom, result = _running_attached(conn, paths, name)
    assert result.secret is not None
    check = result.secret.check()
    agent = FakeAgent(
        paths.boot_socket(dom.UUIDString()),
        lambda n: Announcement(n, "shared-secret", "unpaired", H, None, check, None).to_line(),
    )
    config = tmp_path / "hostguard.toml"
    (tmp_path / "trust").mkdir()
    config.write_text(
        f'[trust]\ndir = "{tmp_path / "trust"}"\n[state]\ndir = "{paths.state_dir}"\n'
        f'[audit]\nlog = "{tmp_path / "audit.jsonl"}"\nsyslog = false\n'
    )
    monkeypatch.setattr("hostguard.host.libvirt.open_connection", lambda: libvirt.open("test:///default"))
    parser = argparse.ArgumentParser(prog="hostguard")
    add_subcommands(parser.add_subparsers(dest="command", required=True), cli._lazy)
    outputs = []
    try:
        for extra in (["--json"], []):
            argv = ["bootchannel", "show", name, "--config", str(config), "--run-dir", str(paths.run_dir), *extra]
            args = parser.parse_args(argv)
            assert cli._run(lambda a=args: int(a.func(a))) == 0  # type: ignore[misc]
            outputs.append(capsys.readouterr().out)
    finally:
        agent.close()
    shown = json.loads(outputs[0])
    assert shown["announcement"]["vm_key"] == H and shown["k_status"] == "shredded"
    assert "k_check" not in shown and "k_check" not in shown["announcement"]
    assert all(check not in out and "k_check" not in out for out in outputs)
    assert "vm key       " + H in outputs[1]
    record = bc.load_record(paths, dom.UUIDString())
    assert record is not None and record["k_check"] == check == record["announcement"]["k_check"]
