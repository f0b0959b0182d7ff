"""Owner <-> VM key exchange end to end: the real libvirtd, QEMU (TCG) and the python test guest with the
guest agent installed in its image.

Three domains ("sites") boot from overlays on ONE agent image, published and SIGNED by the test bed's guarded host
and booted through its installed pre-boot hook (each start must be audited "allow"; the image digest is checked
unchanged at the end): A attached for no-secrets (owner 1), B for shared-secret (owner 2), C for no-secrets with its
OEM string tampered with by the site. The boot channel uses hostguard's default run directory, the only place the
hook's fw_cfg rule accepts K from (no policy is relaxed for the test). The host side is driven through the
`hostguard bootchannel` / `hostguard owner` command handlers in real processes (exit codes and one-line errors),
the attackers through the protocol library. Issue 16: a byte-dropping relay that holds no key cuts first exchanges
at a few message boundaries (the full sweep runs in tests/unit/test_owner_truncation.py); the owner always
finishes with the same K or already holds the VM key, and the VM commits only on the owner's confirm.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hostguard.owner import bootchannel as bc
from hostguard.owner import bundle, session
from hostguard.owner.names import DEFAULT_RUN_DIR
from hostguard.owner.tlschannel import generate_key
from hostguard.owner.tokens import Secret
from tests.testbed import images
from tests.testbed.guarded import GuardedHost
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv
from tests.testbed.prereq import require, require_tool
from tests.unit.owner_fakes import O2V, Cut, SocketCutRelay, clean_counts

AGENT_PATH = "/usr/local/bin/hostguard-guest"
READY = "hostguard-guest: ready vm_key="
CMDLINE = f"hostguard.rw=1 hostguard.run={AGENT_PATH}"
START_RETRY_SECONDS = 300.0
REPO = Path(__file__).resolve().parents[2]
CLI_SHIM = """
import argparse, sys
from hostguard import cli
from hostguard.commands.owner_cmd import add_subcommands
parser = argparse.ArgumentParser(prog="hostguard")
add_subcommands(parser.add_subparsers(dest="command", required=True), cli._lazy)
args = parser.parse_args(sys.argv[1:])
sys.exit(cli._run(lambda: int(args.func(args))))
"""
T = TypeVar("T")


# --- the agent image -------------------------------------------------------------------------------------------------


def agent_image(python_guest: Guest) -> Path:
    """The python guest's root with the agent bundle at AGENT_PATH (debugfs: no host mount), cached by inputs."""
    require_tool("debugfs")
    data = bundle.bundle_bytes()

    def build(d: Path) -> None:
        raw = d / "root.raw"
        shutil.copyfile(python_guest.root_raw, raw)
        agent = d / "hostguard-guest"
        agent.write_bytes(data)
        commands = d / "debugfs.cmds"
        commands.write_text(
            f"cd {os.path.dirname(AGENT_PATH)}\nwrite {agent} hostguard-guest\n"
            "sif hostguard-guest mode 0100755\nsif hostguard-guest uid 0\nsif hostguard-guest gid 0\n"
        )
        images.run(["debugfs", "-w", "-f", commands, raw])
        check = images.run(["debugfs", "-R", f"stat {AGENT_PATH}", raw])
        if f"Size: {len(data)}" not in check:
            raise RuntimeError(f"debugfs did not write the agent: {check[:300]}")
        images.to_qcow2(raw, d / "root.qcow2")
        raw.unlink()
        agent.unlink()
        commands.unlink()
        for f in d.iterdir():
            f.chmod(0o644)

    key = [python_guest.root_qcow2.parent.name, hashlib.sha256(data).hexdigest()]
    return images.cached(key, build, name="owner-agent-root") / "root.qcow2"


# --- libvirt helpers -------------------------------------------------------------------------------------------------


def retrying(env: LibvirtEnv, action: Callable[[], T], seconds: float = START_RETRY_SECONDS) -> T:
    """Run `action` again while another session's temporary hook denies starts or libvirtd restarts."""
    import libvirt

    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except libvirt.libvirtError as err:
            try:
                alive = env.conn.isAlive()
            except libvirt.libvirtError:
                alive = False
            if ("hostguard: denied" not in str(err) and alive) or time.monotonic() > deadline:
                raise
            time.sleep(3)
            env.connection()


@dataclass
class Site:
    """One domain with its boot channel, as a site and its owner see it."""

    name: str
    protocol: str
    owner_key: Path
    owner_hash: str
    uuid: str = ""
    secret_file: Path | None = None
    secret_text: str = ""
    vm_key: str = ""
    paired: bool = False
    ready_line: str = ""
    owner_socket: Path = Path("/nonexistent")
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class World:
    host: GuardedHost
    env: LibvirtEnv
    paths: bc.Paths
    config: Path
    audit_log: Path
    image: Path
    image_digest: str
    sites: dict[str, Site]

    def dom(self, site: Site) -> Any:
        return self.env.connection().lookupByName(site.name)

    def cli(self, *argv: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", CLI_SHIM, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            check=False,
        )

    def site_args(self) -> list[str]:
        return ["--config", str(self.config), "--run-dir", str(self.paths.run_dir)]

    def console(self, site: Site) -> str:
        path = self.env.consoles[site.name]
        return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


def _digest(path: Path) -> str:
    return images.file_digest(path)


def signed_agent_image(host: GuardedHost, python_guest: Guest) -> Path:
    """The agent image as a site receives it: a copy in the guarded host's library with a signed manifest
    (disk digest, kernel and initrd) beside it, so that the installed hook verifies every domain on it."""
    image = host.library / "owner-agent-v1.qcow2"
    shutil.copyfile(agent_image(python_guest), image)
    image.chmod(0o644)
    host.sign_custom(image, host.manifest_for(image, python_guest, "owner-agent"))
    return image


def hook_verdicts(world: World, site: Site) -> list[str]:
    """The installed hook's audited verdicts for `site`'s starts, oldest first ("noted" reconnects left out)."""
    records = world.host.audit_records()
    return [str(r["verdict"]) for r in records if r.get("domain") == site.name and r.get("verdict", "noted") != "noted"]


@pytest.fixture(scope="module")
def world(host: GuardedHost, python_guest: Guest) -> Iterator[World]:
    require(os.geteuid() == 0, "this test needs root")
    require(Path("/usr/bin/qemu-system-x86_64").exists(), "qemu-system-x86 is not installed")
    image = signed_agent_image(host, python_guest)
    digest = _digest(image)
    ours: list[Path] = []  # this module's files in the shared default run directory
    made = [d for d in (Path(DEFAULT_RUN_DIR), Path(DEFAULT_RUN_DIR).parent) if not d.exists()]

    def remove_ours() -> None:
        for p in ours:
            p.unlink(missing_ok=True)
        for d in made:  # the directories too if this module made them and they are empty again
            with contextlib.suppress(OSError):
                d.rmdir()

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remove_ours)  # runs after the domains are gone
        env = cleanup.enter_context(LibvirtEnv())
        paths = bc.Paths(Path(DEFAULT_RUN_DIR), env.path("state"))
        config = env.path("hostguard.toml")
        audit_log = env.path("audit.jsonl")
        config.write_text(
            f'[trust]\ndir = "{env.path("trust")}"\n[state]\ndir = "{paths.state_dir}"\n[audit]\nlog = "{audit_log}"\n'
            "syslog = false\n"
        )
        world = World(host, env, paths, config, audit_log, image, digest, {})
        for label, protocol in (("a", "no-secrets"), ("b", "shared-secret"), ("c", "no-secrets")):
            key = env.path(f"owner-{label}.key")
            out = world.cli("owner", "keygen", "-o", str(key))
            assert out.returncode == 0, out.stderr
            site = Site(env.domain_name(label), protocol, key, out.stdout.strip())
            guest = dataclasses.replace(python_guest, root_qcow2=image)
            disk = env.overlay(image, f"{label}.qcow2")
            dom = env.define_guest(label, guest, disk_path=disk, cmdline_extra=CMDLINE)
            site.uuid = dom.UUIDString()
            site.owner_socket = paths.owner_socket(site.uuid)
            ours += [paths.key_file(site.uuid), paths.boot_socket(site.uuid), site.owner_socket]
            world.sites[label] = site
            args = ["bootchannel", "attach", site.name, "--protocol", protocol, *world.site_args()]
            if protocol == "no-secrets":
                args += ["--owner-key-hash", site.owner_hash]
            else:
                site.secret_file = env.path(f"k-{label}")
                args += ["--secret-out", str(site.secret_file)]
            out = world.cli(*args)
            assert out.returncode == 0, out.stderr
            if site.secret_file is not None:
                site.secret_text = site.secret_file.read_text().strip()
        _tamper_oem(world, world.sites["c"])
        started = time.monotonic()
        for site in world.sites.values():
            start(world, site)
        for site in world.sites.values():
            text = wait_console(world, site, READY)
            site.ready_line = next(line for line in text.splitlines() if READY in line)
            site.timings["boot_to_ready_s"] = time.monotonic() - started
        yield world


def start(world: World, site: Site) -> None:
    """Start through the installed hook. No retry on a denial: with the guarded host's lock held, a denial is
    this host's hook refusing the domain, and its exact reason is the failure."""
    import libvirt

    try:
        retrying(world.env, lambda: world.dom(site).create(), seconds=0.0)
    except libvirt.libvirtError as err:
        pytest.fail(f"{site.name}: the pre-boot hook refused the boot: {err}")
    assert hook_verdicts(world, site)[-1:] == ["allow"], hook_verdicts(world, site)


def wait_console(world: World, site: Site, text: str, timeout: float = 240.0) -> str:
    """Poll the console for `text`; fail at once when the agent could not start. Rides out libvirtd restarts."""
    deadline = time.monotonic() + timeout
    while True:
        log = world.console(site)
        if text in log:
            return log
        if "hostguard-guest: cannot start" in log or "Traceback" in log:
            pytest.fail(f"{site.name}: the guest agent failed:\n{log[-3000:]}")
        if not retrying(world.env, lambda: world.dom(site).isActive()):
            pytest.fail(f"{site.name}: stopped before printing {text!r}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{site.name}: no {text!r} within {timeout:.0f} s:\n{log[-3000:]}")
        time.sleep(0.2)


def _tamper_oem(world: World, site: Site) -> None:
    """The site changes one hex digit of the owner's key hash in the OEM string of C's definition."""
    import libvirt

    dom = world.dom(site)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    good = site.owner_hash
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    assert xml.count(good) == 2  # the OEM string and the metadata
    world.env.connection().defineXML(xml.replace(f"no-secrets:{good}", f"no-secrets:{bad}"))


def _show(world: World, site: Site, *extra: str) -> dict[str, Any]:
    out = world.cli("bootchannel", "show", site.name, "--json", "--wait", "120", *world.site_args(), *extra)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _connect(world: World, site: Site, endpoint: str | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
    return world.cli(
        "owner", "connect", endpoint or f"unix:{site.owner_socket}", "--key", str(site.owner_key), "--json", *extra
    )


def _payload(world: World, label: str, marker: str) -> Path:
    script = world.env.path(f"{label}-script.sh")
    script.write_text(f"#!/usr/bin/busybox sh\necho {marker} keys=$(busybox wc -l < /root/.ssh/authorized_keys)\n")
    payload = world.env.path(f"{label}-payload.json")
    key_line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl owner@laptop"
    payload.write_text(json.dumps({"authorized_keys": [key_line], "scripts": [{"name": "mark", "path": script.name}]}))
    return payload


# --- attackers on the host ---------------------------------------------------------------------------------------


class TerminatingRelay:
    """A malicious relay on the host: serves the owner on `listen` as if it were the VM (own key; no K), and
    talks to the real VM's owner port as if it were the owner (own key; a K of its own)."""

    def __init__(self, listen: Path, upstream: Path, protocol: str, owner_pin: str | None = None) -> None:
        self.key = generate_key()
        self.listen = listen
        self.upstream = upstream
        self.protocol = protocol
        self.owner_pin = owner_pin
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(1)
        self.errors: dict[str, BaseException | None] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        now = dt.datetime.now(dt.UTC)
        conn, _ = self.server.accept()
        conn.settimeout(60)
        face = session.VmState(
            key=self.key,
            protocol=self.protocol,
            secret=Secret.generate() if self.protocol == "shared-secret" else None,
            owner_pin=self.owner_pin,
        )

        class Quiet:
            def paired(self, owner_key: str, protocol: str) -> None:
                pass

            def apply(self, payload: Any) -> list[dict[str, Any]]:
                return []

        with conn:
            try:
                session.vm_session(conn, face, Quiet(), now=now)
                self.errors["as_vm"] = None
            except Exception as exc:
                self.errors["as_vm"] = exc
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.settimeout(60)
            up.connect(str(self.upstream))
            try:
                session.owner_session(
                    up,
                    self.key,
                    secret=Secret.generate() if self.protocol == "shared-secret" else None,
                    vm_pin=None if self.protocol == "shared-secret" else "sha256:" + "00" * 32,
                    now=now,
                )
                self.errors["as_owner"] = None
            except Exception as exc:
                self.errors["as_owner"] = exc

    def close(self) -> None:
        self.thread.join(90)
        self.server.close()
        self.listen.unlink(missing_ok=True)


def _pair_shared_secret(world: World, site: Site) -> dict[str, Any]:
    """The real owner's shared-secret exchange (idempotent across tests); its --json output."""
    if site.paired:
        return {}
    assert site.secret_file is not None
    out = _connect(
        world, site, None, "--secret-file", str(site.secret_file), "--apply", str(_payload(world, "b", "HGT-B-PAYLOAD"))
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    site.vm_key, site.paired = doc["vm_key"], True
    site.timings.update({f"owner_{k}_s": v for k, v in doc["timings"].items()})
    return doc


def _cut_connect(world: World, site: Site, cut: Cut, *extra: str) -> subprocess.CompletedProcess[str]:
    """`owner connect` through a relay on the host that forwards whole messages and cuts at `cut`."""
    listen = world.paths.run_dir / f"{world.env.prefix}cut-{site.name[-1]}.sock"
    relay = SocketCutRelay(listen, site.owner_socket, cut, timeout=90)
    try:
        return _connect(world, site, f"unix:{listen}", *extra)
    finally:
        relay.close()


def _state_becomes(world: World, site: Site, state: str) -> None:
    """The guest's announced pairing state (it may still be handling the cut session)."""
    deadline = time.monotonic() + 60
    while (now := _show(world, site, "--refresh")["announcement"]["state"]) != state:
        assert time.monotonic() < deadline, f"{site.name}: guest state {now}, expected {state}"
        time.sleep(1)


def _session_lines(world: World, site: Site) -> list[str]:
    return [line for line in world.console(site).splitlines() if "hostguard-guest: owner session" in line]


# --- the tests -------------------------------------------------------------------------------------------------------


def test_no_secrets_end_to_end(world: World) -> None:
    site = world.sites["a"]
    t0 = time.monotonic()
    shown = _show(world, site)
    site.timings["collect_s"] = time.monotonic() - t0
    ann = shown["announcement"]
    assert shown["protocol"] == "no-secrets" and ann["state"] == "unpaired"
    assert ann["owner_key"] == site.owner_hash  # the guest echoes the owner key it was given
    assert ann["vm_key"] and ann["vm_key"] in site.ready_line
    site.vm_key = ann["vm_key"]
    assert f'vm-key="{site.vm_key}"' in world.dom(site).XMLDesc(0)  # recorded in the domain metadata

    # Issue 16, no-secrets: a relay drops the owner's confirm (it rides with the TLS Finished) and hangs up: the
    # VM must not pair. Then the confirm gets through and the VM's ready does not: paired, and the owner (who
    # holds the pin from the start) connects as usual below.
    confirm = clean_counts("no-secrets")[O2V] - 3  # the owner's messages before its confirm
    out = _cut_connect(world, site, Cut(O2V, confirm), "--vm-key-hash", site.vm_key)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    _state_becomes(world, site, "unpaired")
    wait_console(world, site, "interrupted: ended before the owner confirmed (not paired)", 30)
    out = _cut_connect(world, site, Cut(O2V, confirm + 1, "close"), "--vm-key-hash", site.vm_key)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    _state_becomes(world, site, "paired")

    out = _connect(
        world, site, None, "--vm-key-hash", site.vm_key, "--apply", str(_payload(world, "a", "HGT-A-PAYLOAD"))
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["vm_key"] == site.vm_key and doc["owner_key"] == site.owner_hash and doc["auth"] == "pinned"
    assert doc["applied"]["digest"].startswith("sha256:")
    assert [r["item"] for r in doc["applied"]["results"]] == ["authorized_keys", "script"]
    assert doc["applied"]["results"][1]["exit"] == 0
    wait_console(world, site, "HGT-A-PAYLOAD keys=1", 30)
    wait_console(world, site, f"succeeded: pinned owner {site.owner_hash}, 1 payload(s)", 30)
    # the close_notify after bye meets a host side that has gone: still a success, never a refusal
    assert not [line for line in _session_lines(world, site) if "refused" in line], _session_lines(world, site)
    site.timings.update({f"owner_{k}_s": v for k, v in doc["timings"].items()})
    site.paired = True
    assert _show(world, site, "--refresh")["announcement"]["state"] == "paired"
    # again, pinned, through the site's TCP relay
    relay = subprocess.Popen(
        [sys.executable, "-c", CLI_SHIM, "bootchannel", "relay", site.name, "--listen", "127.0.0.1:0"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stderr is not None
        line = relay.stderr.readline()
        address = line.split()[1]
        out = _connect(world, site, f"tcp:{address}", "--vm-key-hash", site.vm_key)
        assert out.returncode == 0, out.stderr
    finally:
        relay.terminate()
        relay.wait(10)


def test_shared_secret_end_to_end_k_used_once_and_gone(world: World) -> None:
    import libvirt

    site = world.sites["b"]
    dom = world.dom(site)
    k_raw = base64.urlsafe_b64decode(site.secret_text[5:] + "=")
    # K reached the guest through fw_cfg, and never through the XML
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE, libvirt.VIR_DOMAIN_XML_SECURE):
        assert site.secret_text[5:] not in dom.XMLDesc(flags)
    virsh = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", "--security-info", site.name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "opt/org.hostguard/owner-k" in virsh and site.secret_text[5:] not in virsh
    key_file = world.paths.key_file(site.uuid)
    assert key_file.exists() and (key_file.stat().st_mode & 0o077) == 0

    shown = _show(world, site)  # collect: the guest read K -> the host shreds its copy
    assert shown["announcement"]["state"] == "unpaired" and shown["k_status"] == "shredded"
    assert "k_check" not in shown and "k_check" not in shown["announcement"]  # no commitment to K is shown
    assert not key_file.exists()
    assert "fwcfg" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    wrong = world.env.path("wrong-k")
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, Secret.generate().encode())
    os.close(fd)
    out = _connect(world, site, None, "--secret-file", str(wrong))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "binding failed" in out.stderr and wrong.exists()  # a failed exchange keeps the owner's file

    relay_sock = world.paths.run_dir / f"{world.env.prefix}mitm-b.sock"
    mitm = TerminatingRelay(relay_sock, site.owner_socket, "shared-secret")
    try:
        out = _connect(world, site, f"unix:{relay_sock}", "--secret-file", str(site.secret_file), "--keep-secret")
    finally:
        mitm.close()
    assert out.returncode == 1 and "binding failed" in out.stderr, out.stderr  # the owner caught the relay
    assert "binding failed" in str(mitm.errors["as_owner"])  # and so did the VM
    assert _show(world, site, "--refresh")["announcement"]["state"] == "unpaired"  # K was not burned

    # Issue 16: a byte-dropping relay cuts the first exchange at three boundaries, with the real K.
    assert site.secret_file is not None
    saved = site.secret_file.with_name(site.secret_file.name + ".vm-key")
    secret_args = ("--secret-file", str(site.secret_file))
    confirm = clean_counts("shared-secret")[O2V] - 3  # the owner's messages before its confirm
    # (1) the reported attack: the owner's first encrypted flight (Finished + K mac) goes through, then the
    #     relay hangs up: the VM's mac never arrives. K used to be spent here.
    out = _cut_connect(world, site, Cut(O2V, confirm, "close"), *secret_args)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "verified" not in out.stderr, out.stderr
    assert not saved.exists()
    _state_becomes(world, site, "unpaired")
    wait_console(world, site, "interrupted: ended before the owner confirmed (K not spent)", 30)
    # (2) the VM's mac arrives (the owner verifies and keeps the VM key), the owner's confirm is dropped
    out = _cut_connect(world, site, Cut(O2V, confirm), *secret_args)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "was verified with K" in out.stderr and str(saved) in out.stderr, out.stderr
    vm_key = json.loads(saved.read_text())["vm_key"]
    assert vm_key in out.stderr and vm_key == shown["announcement"]["vm_key"] and vm_key in site.ready_line
    _state_becomes(world, site, "unpaired")  # K still not spent
    # (3) the confirm arrives (the VM pins the owner, spends K), the VM's ready is dropped
    out = _cut_connect(world, site, Cut(O2V, confirm + 1, "close"), *secret_args)
    assert out.returncode == 1 and vm_key in out.stderr and site.secret_file.exists(), out.stderr
    _state_becomes(world, site, "paired")
    wait_console(world, site, "succeeded: secret owner", 30)
    assert "ended without bye" in [line for line in _session_lines(world, site) if "succeeded" in line][-1]
    # the owner runs the same command again: the VM has spent K on it, so it finishes with the kept key
    doc = _pair_shared_secret(world, site)
    assert doc["resumed"] is True and doc["vm_key"] == vm_key and doc["auth"] == "pinned"
    assert not saved.exists()
    wait_console(world, site, "HGT-B-PAYLOAD keys=1", 30)
    assert site.secret_file is not None and not site.secret_file.exists()  # the owner shredded K after use
    assert _show(world, site, "--refresh")["announcement"]["state"] == "paired"
    out = world.cli(
        "owner", "connect", f"unix:{site.owner_socket}", "--key", str(site.owner_key), "--secret-file", str(wrong)
    )
    assert out.returncode == 1 and "no unused shared secret" in out.stderr

    # K is nowhere on the host any more: not in libvirt's files, logs, the audit log, our state, the consoles
    needles = [site.secret_text[5:].encode(), k_raw, site.secret_text.encode()]
    roots = [
        Path("/etc/libvirt"),
        Path("/run/libvirt"),
        Path("/var/lib/libvirt/qemu"),
        Path("/var/log/libvirt"),
        world.paths.run_dir,
        world.paths.state_dir,
        world.env.workdir,
        world.host.dir,  # the hook's audit log and state
    ]
    assert _files_containing(needles, roots, skip={wrong}) == []
    audit = world.audit_log.read_text()
    assert '"bootchannel-attach"' in audit and '"bootchannel-collect"' in audit

    # restart: the next start needs no K file, and the guest stays paired with its owner
    retrying(world.env, lambda: world.dom(site).destroy())
    start(world, site)
    wait_console(world, site, "state=paired")
    out = _connect(world, site, None, "--vm-key-hash", site.vm_key)
    assert out.returncode == 0, out.stderr


def _files_containing(needles: list[bytes], roots: list[Path], skip: set[Path]) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                if p in skip or p.is_symlink() or not p.is_file() or p.suffix in (".qcow2", ".raw"):
                    continue
                with contextlib.suppress(OSError):
                    if p.stat().st_size < 64 * 1024 * 1024 and any(n in p.read_bytes() for n in needles):
                        found.append(p)
    return found


def test_relay_swapping_keys_is_detected_no_secrets(world: World) -> None:
    site = world.sites["a"]
    vm_key = site.vm_key or _show(world, site)["announcement"]["vm_key"]
    relay_sock = world.paths.run_dir / f"{world.env.prefix}mitm-a.sock"
    mitm = TerminatingRelay(relay_sock, site.owner_socket, "no-secrets", owner_pin=site.owner_hash)
    try:
        out = _connect(world, site, f"unix:{relay_sock}", "--vm-key-hash", vm_key)
    finally:
        mitm.close()
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "is not the pinned" in out.stderr  # owner: the VM key was swapped
    assert "owner key" in str(mitm.errors["as_owner"])  # VM: the owner key was swapped
    wait_console(world, site, "refused", timeout=60)  # the guest's line reaches the serial console a bit later
    out = _connect(world, site, None, "--vm-key-hash", vm_key)  # the direct path still works
    assert out.returncode == 0, out.stderr


def test_tampered_oem_string_fails(world: World) -> None:
    site = world.sites["c"]
    shown = _show(world, site)
    ann = shown["announcement"]
    assert ann["owner_key"] != site.owner_hash  # what the guest got is not what the owner gave the site
    out = _connect(world, site, None, "--vm-key-hash", ann["vm_key"])
    assert out.returncode == 1 and "different owner key" in out.stderr, out.stderr
    assert _show(world, site, "--refresh")["announcement"]["state"] == "unpaired"


def test_malformed_boot_channel_messages_do_not_crash_the_agent(world: World) -> None:
    site = world.sites["a"]
    boot_sock = world.paths.boot_socket(site.uuid)
    for junk in (b"garbage\n", b"x" * 5000 + b"\n", b'{"v":1,"type":"query","nonce":"zz"}\n', b"\x00\xff" * 2000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(boot_sock))
            s.sendall(junk)
            time.sleep(0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # junk on the owner port
        s.connect(str(site.owner_socket))
        s.sendall(b"HGOWN1 " + b"{" * 3000 + b"\n")
        s.settimeout(30)
        assert b'"ok":false' in s.recv(4096)
    assert _show(world, site, "--refresh")["announcement"]["vm_key"]  # still answers
    vm_key = site.vm_key or _show(world, site)["announcement"]["vm_key"]
    assert _connect(world, site, None, "--vm-key-hash", vm_key).returncode == 0
    assert "ignored a bad query" in world.console(site)


def test_two_sites_one_image_each_owner_only_reaches_its_own_vm(world: World) -> None:
    a, b = world.sites["a"], world.sites["b"]
    a.vm_key = a.vm_key or _show(world, a)["announcement"]["vm_key"]
    _pair_shared_secret(world, b)
    assert a.vm_key != b.vm_key
    assert _connect(world, a, None, "--vm-key-hash", a.vm_key).returncode == 0
    assert _connect(world, b, None, "--vm-key-hash", b.vm_key).returncode == 0
    # owner B at site A, owner A at site B: refused by the VM (wrong owner) even when pinning its key
    cross = world.cli(
        "owner", "connect", f"unix:{a.owner_socket}", "--key", str(b.owner_key), "--vm-key-hash", a.vm_key
    )
    assert cross.returncode == 1 and "different owner key" in cross.stderr, cross.stderr
    cross = world.cli(
        "owner", "connect", f"unix:{b.owner_socket}", "--key", str(a.owner_key), "--vm-key-hash", b.vm_key
    )
    assert cross.returncode == 1 and "different owner key" in cross.stderr, cross.stderr
    # an owner who pins its own VM's key and is routed to the other site notices at once
    wrong_route = world.cli(
        "owner", "connect", f"unix:{b.owner_socket}", "--key", str(a.owner_key), "--vm-key-hash", a.vm_key
    )
    assert wrong_route.returncode == 1
    # both sites booted the one signed image through the hook: verified and allowed, disks backed by it
    for site in (a, b):
        verdicts = hook_verdicts(world, site)
        assert verdicts and set(verdicts) == {"allow"}, verdicts
        assert str(world.image) in _backing_chain(world, site)
    assert Path(str(world.image) + ".hgsig").exists()
    assert _digest(world.image) == world.image_digest  # one image, unchanged, behind both sites


def _backing_chain(world: World, site: Site) -> str:
    disk = world.env.path(f"{site.name.removeprefix(world.env.prefix)}.qcow2")
    return subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", str(disk)], capture_output=True, text=True, check=True
    ).stdout


def test_timings_are_reported(world: World) -> None:
    """Not an assertion on speed: prints the figures of this run (pytest -s) for docs/benchmarks.md."""
    for label, site in world.sites.items():
        print(f"site {label} ({site.protocol}): {site.ready_line.split('hostguard-guest: ')[-1]}")
        print(f"site {label} timings: {json.dumps({k: round(v, 3) for k, v in site.timings.items()})}")
    assert all(site.ready_line for site in world.sites.values())
