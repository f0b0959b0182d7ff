"""The return direction: ask a running guest for its announcement over the boot port and record it.

The host connects to the unix socket of the ``org.hostguard.boot.0`` channel, writes one query line with a
fresh nonce and reads at most `MAX_LINES` lines of at most 1024 bytes until the announcement that echoes the
nonce; anything malformed is rejected (and counted), never trusted. The announcement goes into the record,
the domain's ``<hgbc:bootchannel>`` metadata and the audit log. When it carries the commitment to the K this
host generated, the K file is shredded and the fw_cfg entry leaves the persistent definition.

`collect` is what hostguardd calls after a domain with a boot channel starts; `hostguard bootchannel show`
calls it too when nothing was collected yet.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from hostguard.errors import FormatError, HostguardError
from hostguard.host import libvirt
from hostguard.host.audit import write_audit
from hostguard.host.libvirt import lookup
from hostguard.owner.bootchannel import (
    Paths,
    channel_socket,
    drop_secret,
    load_record,
    save_record,
    set_metadata,
    utc_now,
)
from hostguard.owner.names import BOOT_PORT
from hostguard.owner.protocol import ChannelError
from hostguard.owner.tokens import MAX_LINE, Announcement, encode_query, new_nonce, parse_announcement
from hostguard.record import Record

MAX_LINES = 8
RETRY = 0.5


def query_guest(sock_path: Path, timeout: float) -> Announcement:
    """Ask the agent behind `sock_path` for its announcement, retrying until `timeout` (it may be booting)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelError(f"no announcement from the guest within {timeout:.0f} s ({last})")
        try:
            return _query_once(sock_path, min(remaining, 5.0))
        except (OSError, ChannelError) as exc:
            last = str(exc) if isinstance(exc, ChannelError) else (exc.strerror or type(exc).__name__)
        time.sleep(min(RETRY, max(0.0, deadline - time.monotonic())))


def _query_once(sock_path: Path, timeout: float) -> Announcement:
    nonce = new_nonce()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(encode_query(nonce))
        buf = b""
        for _ in range(MAX_LINES):
            while b"\n" not in buf:
                if len(buf) > MAX_LINE:
                    raise FormatError(f"guest sent a line longer than {MAX_LINE} bytes")
                try:
                    chunk = sock.recv(MAX_LINE)
                except TimeoutError:
                    raise ChannelError("guest agent did not answer") from None
                if not chunk:
                    raise ChannelError("boot channel closed")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            ann = parse_announcement(line + b"\n")
            if ann.nonce == nonce:
                return ann
        raise ChannelError(f"no answer to this query within {MAX_LINES} lines")


class Collected(Record):
    record: dict[str, Any]
    announcement: Announcement
    secret_shredded: bool


def collect(
    conn: libvirt.Connection, domain: str, paths: Paths, *, timeout: float = 60.0, audit_log: Path | None = None
) -> Collected:
    """Query a running domain's guest agent and record its announcement (see the module docstring)."""

    dom = lookup(conn, domain)
    if not dom.isActive():
        raise HostguardError(f"{dom.name()} is not running: the guest announces itself once it has booted")
    uuid = dom.UUIDString()
    record = load_record(paths, uuid)
    if record is None:
        raise HostguardError(f"{dom.name()} has no boot channel attached by this host")
    sock_path = channel_socket(str(dom.XMLDesc(0)).encode(), BOOT_PORT)
    if sock_path is None:
        raise HostguardError(f"{dom.name()} runs without the boot channel: restart it after `bootchannel attach`")
    ann = query_guest(sock_path, timeout)
    shredded = False
    if record.get("protocol") == "shared-secret" and record.get("k_status") == "pending":
        if ann.k_check is not None and ann.k_check == record.get("k_check"):
            shredded = drop_secret(conn, dom, paths)
            record["k_status"] = "shredded"
            record["k_shredded_at"] = utc_now()
        elif ann.k_check is not None:
            record["k_note"] = "the guest read a different K (an earlier attachment?)"
    if ann.state != "error" and record.get("protocol") != ann.protocol:
        record["protocol_note"] = f"guest reports protocol {ann.protocol}"
    record["announcement"] = ann.to_json()
    record["announced_at"] = utc_now()
    save_record(paths, uuid, record)
    set_metadata(dom, record)
    if audit_log is not None:
        write_audit(
            audit_log,
            {
                "operation": "bootchannel-collect",
                "domain": dom.name(),
                "uuid": uuid,
                "protocol": record.get("protocol"),
                "guest_state": ann.state,
                "vm_key": ann.vm_key,
                "owner_key": ann.owner_key,
                "error": ann.error,
                "k_status": record.get("k_status"),
            },
            to_syslog=False,
        )
    return Collected(record, ann, shredded)
