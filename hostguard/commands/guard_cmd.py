"""`hostguard daemon`, `hostguard status`, `hostguard start`, `hostguard release`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hostguard.errors import EXIT_ALLOW, EXIT_DENY, ConfigError
from hostguard.host import libvirt
from hostguard.host.config import load_config
from hostguard.host.libvirt import lookup, open_connection
from hostguard.host.systemd import journal_handler, stderr_is_journal
from hostguard.poststart import sticky
from hostguard.poststart.daemon import run_daemon
from hostguard.poststart.daemonstatus import daemon_host_error
from hostguard.poststart.enforce import check_and_enforce
from hostguard.poststart.verdicts import load_verdicts


def daemon(args: argparse.Namespace) -> int:

    logging.getLogger().setLevel(logging.INFO if not args.verbose else logging.DEBUG)
    if stderr_is_journal():  # under systemd: native journal entries with priorities instead of stderr text
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.addHandler(journal_handler())
    return run_daemon(Path(args.config) if args.config else None, once=args.once)


def _last_preboot(audit_log: Path, limit: int = 1 << 20) -> dict[str, dict[str, Any]]:
    """The last pre-boot decision per domain name, from the tail of the audit log."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with audit_log.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            tail = fh.read()
    except OSError:
        return out
    for line in tail.splitlines()[1 if size > limit else 0 :]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("operation") in ("prepare", "migrate", "restore"):
            out[str(rec.get("domain"))] = rec
    return out


def status(args: argparse.Namespace) -> int:

    config = load_config(Path(args.config) if args.config else None)
    verdicts = load_verdicts(config.state_dir)
    preboot = _last_preboot(config.audit_log)
    conn = open_connection()
    states = {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    }
    rows = []
    for dom in sorted(conn.listAllDomains(0), key=lambda d: d.name()):
        if args.domain and args.domain not in (dom.name(), dom.UUIDString()):
            continue
        pre = preboot.get(dom.name(), {})
        post = verdicts.get(dom.UUIDString(), {})
        rows.append(
            {
                "domain": dom.name(),
                "uuid": dom.UUIDString(),
                "state": states.get(dom.info()[0], "other"),
                "preboot": pre.get("verdict", "-"),
                "preboot_reason": pre.get("reason", ""),
                "postcheck": post.get("status", "-"),
                "action": post.get("action", ""),
                "findings": len(post.get("findings", [])),
                "checked_at": post.get("checked_at", ""),
                "reason": post.get("reason", ""),
                "trigger": post.get("trigger", ""),
                "duration_ms": post.get("duration_ms"),
                "stats": post.get("stats", {}),  # what each stage read and how (verdict file)
                "held": sticky.held(config.state_dir, dom.UUIDString()) is not None,  # ADR 0020
            }
        )
    conn.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_ALLOW
    problem = daemon_host_error(config.state_dir)
    if problem:
        print(f"daemon: {problem}")
    print(f"{'DOMAIN':24} {'STATE':9} {'PRE-BOOT':10} {'POST-START':10} {'ACTION':8} {'FINDINGS':8} REASON")
    for r in rows:
        reason = ("[held: hostguard release] " if r["held"] else "") + (r["reason"] or r["preboot_reason"])
        print(
            f"{r['domain'][:24]:24} {r['state']:9} {r['preboot']:10} {r['postcheck']:10} {r['action'] or '-':8} "
            f"{r['findings']:<8} {reason[:100]}"
        )
    return EXIT_ALLOW


def start(args: argparse.Namespace) -> int:
    """Start paused, check, resume only on a pass: no guest instruction runs before the verdict."""

    config = load_config(Path(args.config) if args.config else None)
    config.finding_policy()  # a broken [findings] table: one line, before the domain is touched
    conn = open_connection()
    dom = lookup(conn, args.domain)
    # Held before it exists: a resume by anyone while the check runs is undone by the daemon (ADR 0020).
    marker = sticky.quarantine_path(config.state_dir, dom.UUIDString())
    sticky.quarantine(config.state_dir, dom.UUIDString())
    try:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as exc:
        marker.unlink(missing_ok=True)
        raise ConfigError(f"cannot start {args.domain}: {exc.get_error_message()}") from None

    try:
        verdict = check_and_enforce(config, dom, "hostguard-start", resume_on_pass=True)
    finally:
        marker.unlink(missing_ok=True)  # a failed verdict left its own hold (hostguard.poststart.enforce)
    print(f"{args.domain}: {verdict.status}: {verdict.reason}", file=sys.stderr)
    return EXIT_ALLOW if verdict.status == "pass" else EXIT_DENY


def release(args: argparse.Namespace) -> int:
    """The explicit, audited admin act that lets a domain hostguard holds run (until its next check)."""
    import os

    if os.geteuid() != 0:
        raise ConfigError("hostguard release must be run as root")
    reason = sticky.check_reason(args.reason)
    config = load_config(Path(args.config) if args.config else None)
    conn = open_connection()
    try:
        done = sticky.release(config, lookup(conn, args.domain), reason, sticky.who())
    finally:
        conn.close()
    print(f"{args.domain}: {done} (until its next check)", file=sys.stderr)
    return EXIT_ALLOW
