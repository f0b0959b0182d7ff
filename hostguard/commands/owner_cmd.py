"""`hostguard bootchannel ...` (the site's admin) and `hostguard owner ...` (the VM's owner).

`add_subcommands(sub, lazy)` registers both command groups on the top-level parser; handlers are the
functions below, looked up lazily by name through `lazy(module, function)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostguard.errors import EXIT_ALLOW, UsageError

Handler = Callable[[argparse.Namespace], int]
MODULE = "owner_cmd"


def add_subcommands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], lazy: Callable[[str, str], Handler]
) -> None:
    b = sub.add_parser("bootchannel", help="owner boot channel of a domain: tokens in, VM key hash out")
    bsub = b.add_subparsers(dest="bootchannel_command", metavar="SUBCOMMAND", required=True)
    a = bsub.add_parser("attach", help="add the boot channel to a domain's persistent definition (next start)")
    a.add_argument("domain")
    a.add_argument("--protocol", required=True, choices=("shared-secret", "no-secrets"))
    a.add_argument("--owner-key-hash", help="no-secrets: the owner's key hash (sha256:...) from `owner keygen`")
    a.add_argument("--secret-out", help="shared-secret: write K here (new file, mode 0600) or '-' for stdout")
    a.set_defaults(func=lazy(MODULE, "bootchannel_attach"))
    d = bsub.add_parser("detach", help="remove the boot channel and shred K")
    d.add_argument("domain")
    d.set_defaults(func=lazy(MODULE, "bootchannel_detach"))
    s = bsub.add_parser("show", help="the VM's key hash and pairing state, as the guest announced them")
    s.add_argument("domain")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a booting guest (default 30)")
    s.add_argument("--refresh", action="store_true", help="ask the guest again even if an answer is recorded")
    s.set_defaults(func=lazy(MODULE, "bootchannel_show"))
    r = bsub.add_parser("relay", help="expose the VM's owner port on TCP (bytes only; TLS is end to end)")
    r.add_argument("domain")
    r.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    r.set_defaults(func=lazy(MODULE, "bootchannel_relay"))
    sw = bsub.add_parser("sweep", help="shred K files and records of undefined domains")
    sw.set_defaults(func=lazy(MODULE, "bootchannel_sweep"))
    for p in (a, d, s, r, sw):
        p.add_argument("--config", help="hostguard.toml (state dir, audit log); optional")
        p.add_argument(
            "--run-dir", default=None, help="K files and channel sockets (default /run/hostguard/bootchannel)"
        )

    o = sub.add_parser("owner", help="the VM owner's side: keys and the authenticated channel to the VM")
    osub = o.add_subparsers(dest="owner_command", metavar="SUBCOMMAND", required=True)
    k = osub.add_parser("keygen", help="create an Ed25519 owner key (mode 0600) and print its key hash")
    k.add_argument("-o", "--output", required=True)
    k.set_defaults(func=lazy(MODULE, "owner_keygen"))
    h = osub.add_parser("key-hash", help="print the key hash of a PEM key or certificate")
    h.add_argument("file")
    h.set_defaults(func=lazy(MODULE, "owner_key_hash"))
    c = osub.add_parser("connect", help="authenticate the VM, pin its key, optionally apply a payload")
    c.add_argument("endpoint", help="unix:/PATH (or /PATH) or HOST:PORT")
    c.add_argument("--key", required=True, help="owner private key (PEM)")
    c.add_argument("--secret-file", help="shared-secret: K from the site (shredded after success)")
    c.add_argument("--vm-key-hash", help="the VM's key hash: no-secrets, or any connection after pairing")
    c.add_argument("--apply", help="contextualization payload (JSON: authorized_keys, scripts)")
    c.add_argument("--keep-secret", action="store_true", help="do not shred the secret file after success")
    c.add_argument("--timeout", type=float, default=60.0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=lazy(MODULE, "owner_connect"))
    g = osub.add_parser("agent-bundle", help="write the guest agent as one file (zipapp) for an image")
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--python", default="/usr/bin/python3", help="interpreter line for the guest")
    g.set_defaults(func=lazy(MODULE, "owner_agent_bundle"))


# --- bootchannel (site admin) ---------------------------------------------------------------------------------


def _site(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """(Paths, audit log) from --config / the default config if present, else built-in defaults."""
    # lazy: this module builds the owner parsers for every command line
    from hostguard.host.config import DEFAULT_PATH, config_path, load_config
    from hostguard.owner.bootchannel import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, Paths

    run_dir = Path(args.run_dir) if args.run_dir else DEFAULT_RUN_DIR
    source = Path(args.config) if args.config else config_path()
    if args.config or source.exists() or source != DEFAULT_PATH:
        config = load_config(source)
        return Paths(run_dir, config.state_dir), config.audit_log
    return Paths(run_dir, DEFAULT_STATE_DIR), None


def _audit(audit_log: Path | None, record: dict[str, Any]) -> None:
    if audit_log is not None:
        # lazy: this module builds the owner parsers for every command line
        from hostguard.host.audit import write_audit

        write_audit(audit_log, record, to_syslog=False)


def bootchannel_attach(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.host.libvirt import open_connection
    from hostguard.owner.bootchannel import attach
    from hostguard.owner.tokens import parse_key_hash

    if args.protocol == "shared-secret" and not args.secret_out:
        raise UsageError("shared-secret: give --secret-out FILE (created 0600) or --secret-out - (stdout)")
    if args.protocol == "no-secrets" and args.secret_out:
        raise UsageError("no-secrets uses no secret: drop --secret-out")
    owner_key = parse_key_hash(args.owner_key_hash, "--owner-key-hash") if args.owner_key_hash else None
    out_path = None if args.secret_out in (None, "-") else Path(args.secret_out)
    if out_path is not None and out_path.exists():
        raise UsageError(f"{out_path} exists: K is written only to a new file")
    paths, audit_log = _site(args)
    conn = open_connection()
    try:
        result = attach(conn, args.domain, args.protocol, paths, owner_key=owner_key)
    finally:
        conn.close()
    if result.secret is not None:
        try:
            if out_path is None:
                sys.stdout.buffer.write(result.secret.encode())
                sys.stdout.flush()
            else:
                _write_new_private(out_path, result.secret.encode())
        finally:
            result.secret.wipe()
    _audit(
        audit_log,
        {
            "operation": "bootchannel-attach",
            "domain": result.domain,
            "uuid": result.uuid,
            "protocol": result.protocol,
            "owner_key": owner_key,
        },
    )
    when = "at its next start (it is running now)" if result.running else "when it starts"
    print(f"{result.domain}: boot channel ({result.protocol}) attached; the guest sees it {when}", file=sys.stderr)
    return EXIT_ALLOW


def _write_new_private(path: Path, data: bytes) -> None:
    import os

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def bootchannel_detach(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.host.libvirt import open_connection
    from hostguard.owner.bootchannel import detach

    paths, audit_log = _site(args)
    conn = open_connection()
    try:
        shredded = detach(conn, args.domain, paths)
    finally:
        conn.close()
    _audit(audit_log, {"operation": "bootchannel-detach", "domain": args.domain, "secret_shredded": shredded})
    print(f"{args.domain}: boot channel removed" + (" (K shredded)" if shredded else ""), file=sys.stderr)
    return EXIT_ALLOW


def bootchannel_show(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.host.libvirt import lookup, open_connection
    from hostguard.owner.bootchannel import load_record
    from hostguard.owner.collector import collect

    paths, audit_log = _site(args)
    conn = open_connection()
    try:
        dom = lookup(conn, args.domain)
        record = load_record(paths, dom.UUIDString())
        if record is None:
            raise UsageError(f"{dom.name()} has no boot channel (hostguard bootchannel attach)")
        if dom.isActive() and (args.refresh or not record.get("announcement")):
            record = collect(conn, args.domain, paths, timeout=args.wait, audit_log=audit_log).record
    finally:
        conn.close()
    record = _public(record)
    if args.json:
        print(json.dumps(record, indent=1, sort_keys=True))
        return EXIT_ALLOW
    ann = record.get("announcement") or {}
    rows = [
        ("domain", record.get("domain")),
        ("protocol", record.get("protocol")),
        ("owner key", record.get("owner_key") or ann.get("owner_key") or "-"),
        ("vm key", ann.get("vm_key") or "- (not announced yet)"),
        ("guest state", ann.get("state") or "-"),
        ("guest error", ann.get("error")),
        ("K", record.get("k_status")),
        ("K note", record.get("k_note")),
        ("announced", record.get("announced_at") or "-"),
    ]
    for label, value in rows:
        if value:
            print(f"{label:12} {value}")
    return EXIT_ALLOW


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """What `show` prints: the record without the commitment to K, neither the host's (`k_check`) nor the one
    the guest announced (`announcement.k_check`). Not secret, but only the host's shred decision needs it, and
    `k_status`/`k_note` carry that decision; it stays in the root-only record (docs/owner-guide.md)."""
    out = {k: v for k, v in record.items() if k != "k_check"}
    if isinstance(out.get("announcement"), dict):
        out["announcement"] = {k: v for k, v in out["announcement"].items() if k != "k_check"}
    return out


def bootchannel_relay(args: argparse.Namespace) -> int:
    import logging

    # lazy: this module builds the owner parsers for every command line
    from hostguard.host.libvirt import lookup, open_connection
    from hostguard.owner.bootchannel import channel_socket
    from hostguard.owner.names import OWNER_PORT
    from hostguard.owner.relay import Relay

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError("--listen must be HOST:PORT")
    conn = open_connection()
    try:
        dom = lookup(conn, args.domain)
        target = channel_socket(str(dom.XMLDesc(0)).encode(), OWNER_PORT)
    finally:
        conn.close()
    if target is None:
        raise UsageError(f"{args.domain} has no owner port (attach the boot channel and restart the domain)")
    logging.getLogger().setLevel(logging.INFO)
    relay = Relay((host.strip("[]"), int(port)), target)
    print(f"relaying {relay.address[0]}:{relay.address[1]} -> {target}", file=sys.stderr)
    try:
        relay.serve()
    finally:
        relay.close()
    return EXIT_ALLOW


def bootchannel_sweep(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.host.libvirt import open_connection
    from hostguard.owner.bootchannel import forget_undefined

    paths, audit_log = _site(args)
    conn = open_connection()
    try:
        gone = forget_undefined(conn, paths)
    finally:
        conn.close()
    for uuid in gone:
        _audit(audit_log, {"operation": "bootchannel-sweep", "uuid": uuid, "secret_shredded": True})
        print(f"{uuid}: domain undefined, K shredded", file=sys.stderr)
    return EXIT_ALLOW


# --- owner ----------------------------------------------------------------------------------------------------------


def owner_keygen(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.owner.owner_client import keygen

    print(keygen(Path(args.output)))
    return EXIT_ALLOW


def owner_key_hash(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.owner.owner_client import key_hash_of_file

    print(key_hash_of_file(Path(args.file)))
    return EXIT_ALLOW


def owner_connect(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.owner.owner_client import connect

    result = connect(
        args.endpoint,
        Path(args.key),
        secret_file=Path(args.secret_file) if args.secret_file else None,
        vm_key_hash=args.vm_key_hash,
        payload_file=Path(args.apply) if args.apply else None,
        timeout=args.timeout,
        keep_secret=args.keep_secret,
    )
    if args.json:
        doc = {
            "vm_key": result.vm_key,
            "owner_key": result.owner_key,
            "auth": result.auth,
            "applied": None
            if result.applied is None
            else {"digest": result.applied.digest, "results": list(result.applied.results)},
            "timings": result.timings,
            "resumed": result.resumed,
        }
        print(json.dumps(doc, indent=1, sort_keys=True))
        return EXIT_ALLOW
    print(f"vm key     {result.vm_key}")
    print(f"owner key  {result.owner_key}")
    how = "shared secret (K is now spent)" if result.auth == "secret" else "pinned keys"
    if result.resumed:
        how = "pinned keys (the VM spent K when it got our confirm in an interrupted session: K is now spent)"
    print(f"auth       {how}")
    if result.applied is not None:
        print(f"applied    {result.applied.digest}")
        for item in result.applied.results:
            print(f"           {json.dumps(item, sort_keys=True)}")
    return EXIT_ALLOW


def owner_agent_bundle(args: argparse.Namespace) -> int:
    # lazy: this module builds the owner parsers for every command line
    from hostguard.owner.bundle import build_agent

    digest = build_agent(Path(args.output), args.python)
    print(f"{args.output} sha256:{digest}")
    return EXIT_ALLOW
