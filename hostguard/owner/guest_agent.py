"""hostguard-guest: the guest side of the owner key exchange (runs with the guest's python3 + cryptography >= 38).

At boot it reads the boot token from the SMBIOS type 11 OEM strings (/sys/firmware/dmi/entries/11-*/raw) and,
for the shared-secret protocol, K from fw_cfg (/sys/firmware/qemu_fw_cfg/by_name/opt/org.hostguard/owner-k/raw);
loads or generates its Ed25519 key (``<state>/vm.key``, mode 0600); then

* answers the host's queries on the virtio-serial port ``org.hostguard.boot.0`` with its announcement
  (protocol, state, its key hash, the owner key it pinned, a commitment to K - never K itself);
* serves owner sessions on the virtio-serial port ``org.hostguard.owner.0`` and, with ``--listen-tcp``, on TCP,
  one at a time; after authentication it applies the owner's payload (authorized SSH keys, owner-signed
  scripts) and answers with its digest.

The first successful session pins the owner (``<state>/pairing.json``); from then on the boot tokens are
ignored and K is never used again. Shipped as one zipapp file by `hostguard.owner.bundle`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostguard.errors import FormatError, HostguardError
from hostguard.owner.names import BOOT_PORT, FWCFG_NAME, OWNER_PORT
from hostguard.owner.protocol import ChannelError, Payload
from hostguard.owner.session import VmState, vm_session
from hostguard.owner.tlschannel import generate_key, load_private_key, private_key_pem
from hostguard.owner.tokens import (
    MAX_LINE,
    PROTOCOLS,
    Announcement,
    Secret,
    find_boot_token,
    parse_key_hash,
    parse_query,
)
from hostguard.record import Record

DEFAULT_STATE_DIR = Path("/var/lib/hostguard-guest")
DEFAULT_AUTHORIZED_KEYS = Path("/root/.ssh/authorized_keys")
SESSION_TIMEOUT = 30.0
SCRIPT_TIMEOUT = 120.0
IDLE_POLL = 0.2
MAX_DMI_ENTRY = 64 * 1024


def log(message: str) -> None:
    print(f"hostguard-guest: {message}", flush=True)


# --- boot tokens from firmware ------------------------------------------------------------------------------


def parse_smbios_strings(raw: bytes) -> list[str]:
    """The strings of one SMBIOS structure (for type 11: the OEM strings), bounded and NUL-safe."""
    if len(raw) < 4 or raw[1] < 4 or raw[1] > len(raw) or len(raw) > MAX_DMI_ENTRY:
        raise FormatError("SMBIOS structure is truncated or too large")
    out: list[str] = []
    for item in raw[raw[1] :].split(b"\0"):
        if not item:
            break
        out.append(item.decode("utf-8", "replace"))
    return out


def read_oem_strings(sysfs: Path) -> list[str]:
    out: list[str] = []
    for entry in sorted((sysfs / "firmware/dmi/entries").glob("11-*")):
        with (entry / "raw").open("rb") as fh:
            raw = fh.read(MAX_DMI_ENTRY + 1)
        if raw[:1] == b"\x0b":
            out += parse_smbios_strings(raw)
    return out


def read_fwcfg(sysfs: Path, name: str, limit: int = 4096) -> bytes | None:
    path = sysfs / "firmware/qemu_fw_cfg/by_name" / name / "raw"
    try:
        with path.open("rb") as fh:
            return fh.read(limit + 1)
    except FileNotFoundError:
        return None


# --- persistent state -------------------------------------------------------------------------------------------


class Store:
    """<state>/vm.key (the VM's private key) and <state>/pairing.json (the pinned owner), both 0600."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def load_or_create_key(self) -> tuple[Any, bool]:
        path = self.dir / "vm.key"
        try:
            return load_private_key(path.read_bytes(), f"VM key {path}"), False
        except FileNotFoundError:
            key = generate_key()
            self._write(path, private_key_pem(key))
            return key, True

    def load_pairing(self) -> tuple[str, str] | None:
        try:
            doc = json.loads((self.dir / "pairing.json").read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            raise FormatError("pairing.json is corrupt") from None
        if not isinstance(doc, dict) or doc.get("protocol") not in PROTOCOLS:
            raise FormatError("pairing.json is malformed")
        return parse_key_hash(str(doc.get("owner_key")), "pinned owner key"), str(doc["protocol"])

    def save_pairing(self, owner_key: str, protocol: str) -> None:
        doc = {"v": 1, "owner_key": owner_key, "protocol": protocol, "paired_at": _utc_now().isoformat()}
        self._write(self.dir / "pairing.json", json.dumps(doc).encode())

    def _write(self, path: Path, data: bytes) -> None:
        write_private(path, data)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600 (never through a symlink). Runs in the guest, where the
    agent bundle carries only the protocol core, not hostguard.host.fsutil.atomic_write."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- the agent ----------------------------------------------------------------------------------------------------


class Boot(Record, frozen=False):
    state: VmState
    k_check: str | None
    error: str | None
    timings: dict[str, float]


def boot(store: Store, sysfs: Path, clock: Callable[[], float] = time.monotonic) -> Boot:
    """Read tokens and key; never raises for bad tokens (they become an announced error)."""
    t0 = clock()
    timings: dict[str, float] = {}
    error: str | None = None
    token = None
    secret = None
    try:
        token = find_boot_token(read_oem_strings(sysfs))
    except FormatError as exc:
        error = "token-ambiguous" if "different boot tokens" in exc.message else "token-malformed"
    except OSError:
        error = "token-malformed"
    if token is not None and token.protocol == "shared-secret":
        blob = read_fwcfg(sysfs, FWCFG_NAME)
        if blob is None:
            error = "secret-missing"
        else:
            try:
                secret = Secret.parse(blob)
            except FormatError:
                error = "secret-malformed"
    timings["token_read"] = clock() - t0
    store.ensure()
    t1 = clock()
    from cryptography.hazmat.backends import default_backend  # timed apart from keygen: loads OpenSSL (<= 38)

    default_backend()
    timings["crypto_init"] = clock() - t1
    t1 = clock()
    key, created = store.load_or_create_key()
    timings["keygen" if created else "key_load"] = clock() - t1
    state = VmState(key=key, protocol=token.protocol if token else "none")
    try:
        pairing = store.load_pairing()
    except FormatError:
        pairing, error = None, "state-unreadable"
    k_check = secret.check() if secret is not None else None
    if pairing is not None:
        state.owner_pin, state.paired = pairing[0], True
        if secret is not None:
            secret.wipe()  # paired: K is never used again
    elif token is not None and token.protocol == "no-secrets":
        state.owner_pin = token.owner_key
    else:
        state.secret = secret
    return Boot(state, k_check, None if pairing is not None else error, timings)


class Agent:
    def __init__(self, store: Store, booted: Boot, authorized_keys: Path) -> None:
        self.store = store
        self.boot = booted
        self.state = booted.state
        self.authorized_keys = authorized_keys
        self.session_lock = threading.Lock()

    # VmHandler
    def paired(self, owner_key: str, protocol: str) -> None:
        self.store.save_pairing(owner_key, protocol)
        self.boot.error = None
        log(f"paired with owner {owner_key} ({protocol})")

    def apply(self, payload: Payload) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        if payload.authorized_keys:
            data = ("\n".join(payload.authorized_keys) + "\n").encode()
            self.authorized_keys.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(self.authorized_keys, data)
            results.append(
                {
                    "item": "authorized_keys",
                    "path": str(self.authorized_keys),
                    "count": len(payload.authorized_keys),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        scripts = self.store.dir / "scripts"
        scripts.mkdir(mode=0o700, exist_ok=True)
        for script in payload.scripts:
            path = scripts / script.name
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
            with os.fdopen(fd, "wb") as fh:
                fh.write(script.content)
            log(f"running owner script {script.name}")
            try:
                code = subprocess.run(
                    [str(path)], stdin=subprocess.DEVNULL, timeout=SCRIPT_TIMEOUT, check=False
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                log(f"owner script {script.name} failed: {type(exc).__name__}")
                code = -1
            results.append(
                {
                    "item": "script",
                    "name": script.name,
                    "sha256": hashlib.sha256(script.content).hexdigest(),
                    "exit": code,
                }
            )
        log(f"applied payload {payload.digest()} ({len(payload.authorized_keys)} keys, {len(payload.scripts)} scripts)")
        return results

    def announcement(self, nonce: str) -> Announcement:
        s = self.state
        if s.paired:
            state, error = "paired", None
        elif self.boot.error is not None:
            state, error = "error", self.boot.error
        else:
            state, error = "unpaired", None
        return Announcement(nonce, s.protocol, state, s.vm_key, s.owner_pin, self.boot.k_check, error)

    def serve(self, stream: Any, where: str) -> None:
        """One owner session, logged as exactly one of: succeeded, interrupted (the transport failed before
        the owner confirmed: nothing committed), refused (authentication or protocol), failed (a bug)."""
        with self.session_lock:
            try:
                outcome = vm_session(stream, self.state, self, now=_utc_now())
            except ChannelError as exc:
                log(f"owner session on {where} interrupted: {exc}")
            except HostguardError as exc:
                log(f"owner session on {where} refused: {exc}")
            except OSError as exc:
                log(f"owner session on {where} interrupted: {type(exc).__name__}: {exc.strerror or exc}")
            except Exception as exc:  # noqa: BLE001 - a bug hit by one hostile session must not end the agent
                log(f"owner session on {where} failed: internal error {type(exc).__name__}")
            else:
                what = f"{outcome.auth} owner {outcome.owner_key}, {outcome.applied} payload(s)"
                tail = "" if outcome.ended is None else f"; the connection then ended without bye ({outcome.ended})"
                log(f"owner session on {where} succeeded: {what}{tail}")


# --- virtio-serial ports ----------------------------------------------------------------------------------------


def find_port(sysfs: Path, name: str, dev: Path = Path("/dev")) -> Path | None:
    for entry in sorted((sysfs / "class/virtio-ports").glob("vport*")):
        try:
            if (entry / "name").read_text().strip() == name:
                return dev / entry.name
        except OSError:
            continue
    return None


class PortStream:
    """A virtio-serial port as a stream. While the host side is not connected reads return EOF at once and
    writes would block, so waiting for a peer is a poll loop, and every wait has a deadline."""

    def __init__(self, path: Path, timeout: float = SESSION_TIMEOUT) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.timeout = timeout
        self._pending = b""

    def wait_for_peer(self) -> None:
        """Block until the host side sends something (the start of a session)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                self._wait(select.POLLIN, None)
                continue
            if data:
                self._pending = data
                return
            time.sleep(IDLE_POLL)  # host side not connected

    def recv(self, n: int, /) -> bytes:
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
            return out
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return os.read(self.fd, n)  # b"": the host side went away
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)

    def sendall(self, data: bytes, /) -> None:
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                if self._wait(select.POLLOUT, deadline) & select.POLLHUP:
                    raise ChannelError("host side of the port disconnected") from None

    def _wait(self, events: int, deadline: float | None) -> int:
        poller = select.poll()
        poller.register(self.fd, events)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError("virtio-serial port timed out")
        ready = poller.poll(None if remaining is None else max(1, int(remaining * 1000)))
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("virtio-serial port timed out")
        return ready[0][1] if ready else 0


def boot_port_loop(port: PortStream, agent: Agent) -> None:
    """Answer every well-formed query line; skip anything else (bounded), never crash."""
    buf = b""
    while True:
        if not buf:
            port.wait_for_peer()
        try:
            chunk = port.recv(4096)
        except TimeoutError:
            buf = b""
            continue
        if not chunk:
            buf = b""
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                nonce = parse_query(line + b"\n")
            except FormatError as exc:
                log(f"boot channel: ignored a bad query ({exc.message[:60]})")
                continue
            try:
                port.sendall(agent.announcement(nonce).to_line())
            except (OSError, HostguardError) as exc:
                log(f"boot channel: could not answer ({exc})")
        if len(buf) > MAX_LINE:
            log("boot channel: dropped an overlong line")
            buf = b""


def owner_port_loop(port: PortStream, agent: Agent) -> None:
    while True:
        port.wait_for_peer()
        agent.serve(port, "virtio-serial")


def tcp_loop(address: tuple[str, int], agent: Agent) -> None:
    with socket.create_server(address, reuse_port=False) as server:
        log(f"listening on tcp {address[0]}:{address[1]}")
        while True:
            conn, peer = server.accept()
            with conn:
                conn.settimeout(SESSION_TIMEOUT)
                agent.serve(conn, f"tcp {peer[0]}")


# --- main -------------------------------------------------------------------------------------------------------------


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostguard-guest", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--authorized-keys", type=Path, default=DEFAULT_AUTHORIZED_KEYS)
    parser.add_argument("--sysfs", type=Path, default=Path("/sys"))
    parser.add_argument("--listen-tcp", type=_address, metavar="HOST:PORT", help="also serve owners over TCP")
    parser.add_argument("--no-ports", action="store_true", help="do not use the virtio-serial ports")
    parser.add_argument("--announce", action="store_true", help="print the announcement and exit")
    args = parser.parse_args(argv)
    started = time.monotonic()
    store = Store(args.state_dir)
    try:
        booted = boot(store, args.sysfs)
    except (OSError, HostguardError, ImportError) as exc:  # ImportError: a guest without cryptography's backend
        log(f"cannot start: {type(exc).__name__}: {exc}")
        return 1
    agent = Agent(store, booted, args.authorized_keys)
    ann = agent.announcement("0" * 32)
    timings = " ".join(f"{k}_ms={v * 1000:.1f}" for k, v in booted.timings.items())
    uptime = _uptime()
    log(
        f"ready vm_key={ann.vm_key} protocol={ann.protocol} state={ann.state}"
        + (f" error={ann.error}" if ann.error else "")
        + f" {timings} start_ms={(time.monotonic() - started) * 1000:.1f}"
        + (f" uptime_s={uptime:.2f}" if uptime is not None else "")
    )
    if args.announce:
        return 0
    threads: list[threading.Thread] = []
    if not args.no_ports:
        for name, loop in ((BOOT_PORT, boot_port_loop), (OWNER_PORT, owner_port_loop)):
            path = find_port(args.sysfs, name)
            if path is None:
                log(f"no virtio-serial port {name}")
                continue
            port = PortStream(path)
            threads.append(threading.Thread(target=loop, args=(port, agent), name=name, daemon=True))
    if args.listen_tcp:
        threads.append(threading.Thread(target=tcp_loop, args=(args.listen_tcp, agent), name="tcp", daemon=True))
    if not threads:
        log("nothing to serve: no ports and no --listen-tcp")
        return 1
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
