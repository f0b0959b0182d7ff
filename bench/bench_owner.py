"""Owner <-> VM key exchange: time from VM boot to an authenticated owner channel, both protocols, on the real
python test guest (TCG), and the hostguard handshake against a plain TLS 1.3 connection over the SAME transport.

Per boot round and protocol, a fresh domain (overlay on the agent image, so the agent generates a new key):

  boot        host wall time from `create()` to the agent's ready line on the console (QEMU start, kernel,
              init, agent start); the guest's own uptime at that line is printed beside it
  token_read  / crypto_init / keygen: the agent's own figures from its ready line (guest clock)
  hash_relay  `collector.collect`: query the agent over the boot channel (virtio-serial), record the VM's key hash
              in the domain metadata (shared-secret: also drops K from the definition and shreds the host copy)
  handshake   one owner session (`session.owner_session`, no payload) over the owner port's unix socket:
              connect, hellos, TLS 1.3 with pinned ephemeral certificates, K binding (shared-secret: both
              macs, one round trip), the owner's confirm (pinned: sent with the TLS Finished), ready

Then, on the same running domain, `--rounds` alternating rounds of
  hostguard   a pinned owner session (after the first shared-secret one, K is burnt: sessions are pinned)
  plain-tls   a bare TLS 1.3 connection over a THIRD virtio-serial port of the same domain, exposed the same way
              as a host unix socket, served in the guest by a small helper with the agent's own TLS code
              (`TlsChannel` over the virtio-serial port, same `tls_context`: TLS 1.3, mutual, each side pinning
              the other's Ed25519 self-signed certificate made by `ephemeral_cert`), then one frame round trip
              (raw bytes: so the server has checked the client certificate, as hostguard's `ready` shows)
The plain side's certificates are made once on the host and handed to the helper on a small raw disk; hostguard
makes fresh certificates every session (that is part of its cost, and measured).

    sudo .venv/bin/python bench/bench_owner.py [--boots 2] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import re
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import log, machine_context

from hostguard.owner import bootchannel as bc
from hostguard.owner import bundle, collector
from hostguard.owner.session import owner_session
from hostguard.owner.tlschannel import TlsChannel, ephemeral_cert, generate_key, private_key_pem, tls_context
from hostguard.owner.tokens import Secret, public_key_hash
from tests.testbed import content, guests, images
from tests.testbed.guests import Guest
from tests.testbed.libvirt_env import LibvirtEnv

AGENT_PATH = "/usr/local/bin/hostguard-guest"
PLAIN_PATH = "/usr/local/bin/hg-plain-tls"
PLAIN_PORT = "org.hostguard.bench.plain"
READY = "hostguard-guest: ready vm_key="
PLAIN_READY = "hg-plain-tls: ready"
TARGET = 1.5
SESSION_TIMEOUT = 120.0

# The guest's plain TLS server: the agent's zipapp on sys.path, its virtio-serial stream and TLS channel, no
# hostguard protocol. Material (its key, its cert, the client's cert) comes from /dev/vdb as padded JSON.
PLAIN_SERVER = f"""#!/usr/bin/python3
import base64, json, sys, time
sys.path.insert(0, "{AGENT_PATH}")
from pathlib import Path
from hostguard.owner.guest_agent import PortStream, find_port
from hostguard.owner.tlschannel import TlsChannel, load_private_key, tls_context

def say(msg):
    print("hg-plain-tls: " + msg, flush=True)

with open("/dev/vdb", "rb") as fh:
    doc = json.loads(fh.read(65536).rstrip(b"\\0 "))
key = load_private_key(doc["key"].encode())
ctx = tls_context(server=True, key=key, cert_der=base64.b64decode(doc["cert"]),
                  peer_cert_der=base64.b64decode(doc["peer"]))
path = None
while path is None:
    path = find_port(Path("/sys"), "{PLAIN_PORT}")
    time.sleep(0 if path else 0.2)
port = PortStream(path, timeout=60)
say("ready")
while True:
    port.wait_for_peer()
    try:
        chan = TlsChannel(ctx, port, server_side=True)
        chan.handshake()
        chan.recv_exact(5)  # ping
        chan.send(b"pong\\n")
        chan.recv_exact(4)  # bye
    except Exception as exc:
        say("session failed: %s: %s" % (type(exc).__name__, exc))
    try:
        while port.recv(65536):  # drain until the host side hangs up: the next session starts clean
            pass
    except Exception:
        pass
"""


# --- image and domains -----------------------------------------------------------------------------------------


def bench_image(python_guest: Guest) -> Path:
    """The python guest's root with the agent and the plain TLS helper (debugfs), cached by inputs."""
    agent = bundle.bundle_bytes()
    helper = PLAIN_SERVER.encode()

    def build(d: Path) -> None:
        raw = d / "root.raw"
        shutil.copyfile(python_guest.root_raw, raw)
        cmds = ["cd /usr/local/bin"]
        for name, data in (("hostguard-guest", agent), ("hg-plain-tls", helper)):
            (d / name).write_bytes(data)
            cmds += [f"write {d / name} {name}", f"sif {name} mode 0100755", f"sif {name} uid 0", f"sif {name} gid 0"]
        (d / "cmds").write_text("\n".join(cmds) + "\n")
        images.run(["debugfs", "-w", "-f", d / "cmds", raw])
        for path, data in ((AGENT_PATH, agent), (PLAIN_PATH, helper)):
            if f"Size: {len(data)}" not in images.run(["debugfs", "-R", f"stat {path}", raw]):
                raise RuntimeError(f"debugfs did not write {path}")
        images.to_qcow2(raw, d / "root.qcow2")
        for name in ("root.raw", "hostguard-guest", "hg-plain-tls", "cmds"):
            (d / name).unlink()
        (d / "root.qcow2").chmod(0o644)

    key = [python_guest.root_qcow2.parent.name, hashlib.sha256(agent).hexdigest(), hashlib.sha256(helper).hexdigest()]
    return images.cached(key, build, name="owner-bench-root") / "root.qcow2"


@dataclasses.dataclass
class Plain:
    """The plain TLS side: the owner's key and cert, the guest's cert, and the disk carrying the guest's part."""

    key: Any
    cert: bytes
    peer: bytes
    disk: Path


def plain_material(env: LibvirtEnv, owner_key: Any) -> Plain:
    now = dt.datetime.now(dt.UTC)
    guest_key = generate_key()
    guest_cert = ephemeral_cert(guest_key, "vm", now)
    owner_cert = ephemeral_cert(owner_key, "owner", now)
    doc = {
        "key": private_key_pem(guest_key).decode(),
        "cert": base64.b64encode(guest_cert).decode(),
        "peer": base64.b64encode(owner_cert).decode(),
    }
    data = json.dumps(doc).encode()
    disk = env.path("plain-material.raw")
    disk.write_bytes(data + b" " * (65536 - len(data)))
    disk.chmod(0o644)
    return Plain(owner_key, owner_cert, guest_cert, disk)


def retrying(env: LibvirtEnv, action: Callable[[], Any], seconds: float = 300.0) -> Any:
    """Run `action` again while another session's temporary hook denies starts or libvirtd restarts."""
    import libvirt

    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except libvirt.libvirtError as err:
            if "hostguard: denied" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(3)
            env.connection()


def define(env: LibvirtEnv, label: str, guest: Guest, image: Path, plain: Plain, run_dir: Path) -> Any:
    """A domain on an overlay of `image`, with the plain TLS port and the material disk (vdb)."""
    disk = env.overlay(image, f"{label}.qcow2")
    cmdline = f"hostguard.rw=1 hostguard.run={AGENT_PATH} hostguard.run={PLAIN_PATH}"
    xml = env.domain_xml(
        label, dataclasses.replace(guest, root_qcow2=image), disk_path=disk, cmdline_extra=cmdline,
        extra_disks=[plain.disk],
    )  # fmt: skip
    channel = (
        f"<channel type='unix'><source mode='bind' path='{run_dir / (label + '-plain.sock')}'/>"
        f"<target type='virtio' name='{PLAIN_PORT}'/></channel>"
    )
    xml = xml.replace("<memballoon", channel + "\n    <memballoon", 1)
    full = env.domain_name(label)
    env.names.append(full)
    env.consoles[full] = env.path(f"{label}-console.log")
    return env.connection().defineXML(xml)


def wait_line(env: LibvirtEnv, name: str, needle: str, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = env.consoles[name]
        text = path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if "Traceback" in text or "cannot start" in text:
            raise RuntimeError(f"{name}: the guest failed:\n{text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{name}: no {needle!r} within {timeout:.0f} s")


# --- one session of each kind ---------------------------------------------------------------------------------------


def unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(SESSION_TIMEOUT)
    s.connect(str(path))
    return s


def hostguard_session(
    path: Path, key: Any, *, secret: Secret | None, vm_pin: str | None
) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    with unix(path) as s:
        result = owner_session(s, key, secret=secret, vm_pin=vm_pin, now=dt.datetime.now(dt.UTC))
    return time.perf_counter() - t0, result.timings


def plain_session(path: Path, plain: Plain) -> float:
    t0 = time.perf_counter()
    with unix(path) as s:
        chan = TlsChannel(
            tls_context(server=False, key=plain.key, cert_der=plain.cert, peer_cert_der=plain.peer),
            s,
            server_side=False,
        )
        chan.handshake()
        chan.send(b"ping\n")
        if chan.recv_exact(5) != b"pong\n":
            raise RuntimeError("the plain TLS helper answered something else than pong")
        chan.send(b"bye\n")
        elapsed = time.perf_counter() - t0
        chan.close()
    time.sleep(0.3)  # let the guest see the hang-up before the next session (untimed)
    return elapsed


# --- the benchmark --------------------------------------------------------------------------------------------------


def agent_figures(line: str) -> dict[str, float]:
    out = {k: float(v) / 1000 for k, v in re.findall(r"(\w+)_ms=([\d.]+)", line)}
    m = re.search(r"uptime_s=([\d.]+)", line)
    if m:
        out["guest_uptime"] = float(m.group(1))
    return out


def one_boot(env: LibvirtEnv, paths: bc.Paths, guest: Guest, image: Path, plain: Plain, protocol: str,
             label: str, key: Any, rounds: int) -> dict[str, Any]:  # fmt: skip
    owner_hash = public_key_hash(key.public_key())
    dom = define(env, label, guest, image, plain, paths.run_dir)
    conn = env.connection()
    attached = bc.attach(conn, dom.name(), protocol, paths, owner_key=owner_hash if protocol == "no-secrets" else None)
    secret = attached.secret
    t0 = time.perf_counter()
    retrying(env, lambda: env.connection().lookupByName(dom.name()).create())
    ready = wait_line(env, dom.name(), READY)
    boot = time.perf_counter() - t0
    wait_line(env, dom.name(), PLAIN_READY, 120)
    figures = agent_figures(ready)
    t1 = time.perf_counter()
    collected = collector.collect(env.connection(), dom.name(), paths, timeout=120)
    relay = time.perf_counter() - t1
    vm_key = collected.announcement.vm_key
    owner_sock = paths.owner_socket(dom.UUIDString())
    plain_sock = paths.run_dir / f"{label}-plain.sock"
    first, first_parts = hostguard_session(owner_sock, key, secret=secret, vm_pin=None if secret else vm_key)
    if secret is not None:
        secret.wipe()
    samples: dict[str, list[float]] = {"hostguard": [], "plain-tls": []}
    parts: dict[str, list[float]] = {"hello": [], "handshake": []}
    for r in range(rounds):
        order = ("hostguard", "plain-tls") if r % 2 == 0 else ("plain-tls", "hostguard")
        for which in order:
            if which == "plain-tls":
                samples[which].append(plain_session(plain_sock, plain))
            else:
                elapsed, t = hostguard_session(owner_sock, key, secret=None, vm_pin=vm_key)
                samples[which].append(elapsed)
                for k, values in parts.items():
                    values.append(t.get(k, 0.0))
                time.sleep(0.3)
    retrying(env, lambda: env.connection().lookupByName(dom.name()).destroy())
    return {
        "protocol": protocol,
        "boot_s": boot,
        "guest_uptime_at_ready_s": figures.get("guest_uptime"),
        "token_read_s": figures.get("token_read"),
        "crypto_init_s": figures.get("crypto_init"),
        "keygen_s": figures.get("keygen"),
        "agent_start_s": figures.get("start"),
        "hash_relay_s": relay,
        "first_session_s": first,
        "first_session_parts_s": first_parts,
        "boot_to_channel_s": boot + relay + first,
        "samples_s": samples,
        "pinned_parts_s": parts,
    }


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    print("\nBoot to an authenticated owner channel (median over boots; seconds)")
    cols = (
        "boot_s",
        "token_read_s",
        "crypto_init_s",
        "keygen_s",
        "hash_relay_s",
        "first_session_s",
        "boot_to_channel_s",
    )
    print(f"{'protocol':<14}" + "".join(f"{c.removesuffix('_s'):>17}" for c in cols))
    for protocol in ("no-secrets", "shared-secret"):
        mine = [r for r in runs if r["protocol"] == protocol]
        row = {c: med([r[c] for r in mine if r[c] is not None]) for c in cols}
        summary[protocol] = {"boots": len(mine), **row}
        print(f"{protocol:<14}" + "".join(f"{row[c]:>17.3f}" for c in cols))
    print("  (boot: host wall create() -> agent ready line; first_session: the first owner session, for")
    print("   shared-secret the one using K and its HMAC binding; token_read/crypto_init/keygen: guest clock)")
    print("\nHandshake over the same virtio-serial unix-socket transport (median, min over all rounds; seconds)")
    hg = [x for r in runs for x in r["samples_s"]["hostguard"]]
    pl = [x for r in runs for x in r["samples_s"]["plain-tls"]]
    print(f"{'hostguard pinned session':<28}{med(hg):>10.3f}{min(hg):>10.3f}   n={len(hg)}")
    print(f"{'plain TLS 1.3 + 1 round trip':<28}{med(pl):>10.3f}{min(pl):>10.3f}   n={len(pl)}")
    ratio = med(hg) / med(pl)
    print(f"ratio hostguard/plain (medians) = {ratio:.2f}x (goal <= {TARGET}x): {'ok' if ratio <= TARGET else 'OVER'}")
    ss = [r["first_session_s"] for r in runs if r["protocol"] == "shared-secret"]
    if ss:
        print(f"shared-secret first session (K + binding) / plain = {med(ss) / med(pl):.2f}x (n={len(ss)})")
    summary["handshake"] = {"hostguard_median_s": med(hg), "plain_median_s": med(pl), "ratio": ratio,
                            "shared_secret_first_over_plain": med(ss) / med(pl) if ss else None}  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--boots", type=int, default=2, help="fresh boots per protocol")
    ap.add_argument("--rounds", type=int, default=5, help="alternating hostguard/plain sessions per boot")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    guest = guests.python_guest(content.kernel_version())
    image = bench_image(guest)
    runs: list[dict[str, Any]] = []
    with LibvirtEnv() as env:
        short = env.prefix.removeprefix("hgt-").rstrip("-")
        paths = bc.Paths(Path(f"/run/hgbb-{short}"), env.path("state"))
        try:
            key = generate_key()
            plain = plain_material(env, key)
            for b in range(args.boots):
                for protocol in ("no-secrets", "shared-secret"):
                    label = f"{'ns' if protocol == 'no-secrets' else 'ss'}{b}"
                    log(f"boot {b + 1}/{args.boots}: {protocol}")
                    run = one_boot(env, paths, guest, image, plain, protocol, label, key, args.rounds)
                    log(json.dumps(run))
                    runs.append(run)
        finally:
            shutil.rmtree(paths.run_dir, ignore_errors=True)
    summary = report(runs)
    if args.json:
        doc = {"machine": machine_context(), "args": vars(args) | {"json": str(args.json)}, "runs": runs,
               "summary": summary}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
