"""`hostguard memory inspect | baseline` and `hostguard domain check-config`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import EXIT_ALLOW, EXIT_DENY, ConfigError
from hostguard.host.config import load_config
from hostguard.host.libvirt import lookup, open_connection
from hostguard.host.statedir import StateDir, load_domain_record
from hostguard.memory.checkconfig import check_config as check
from hostguard.memory.inspect import inspect_domain_memory, record_vdso_baseline
from hostguard.poststart.memory_stage import hold_dir
from hostguard.poststart.reverify import load_verified_manifest


def _domain_inputs(args: argparse.Namespace) -> tuple[Any, Any, Path | None, Path | None]:
    """(config, manifest, kernel, initrd) for a running domain verified by the hook."""

    config = load_config(Path(args.config) if args.config else None)
    conn = open_connection()
    try:
        dom = lookup(conn, args.domain)
        spec = parse_domain_xml(dom.XMLDesc(0).encode())
    finally:
        conn.close()
    record = load_domain_record(config.state_dir, spec.uuid)
    if record is None:
        raise ConfigError(f"{args.domain} has no pre-boot record: it was not started through the hostguard hook")
    manifest = load_verified_manifest(config, Path(record.primary_envelope()))
    kernel = Path(args.kernel) if args.kernel else (Path(spec.os.kernel) if spec.os.kernel else None)
    initrd = Path(args.initrd) if args.initrd else (Path(spec.os.initrd) if spec.os.initrd else None)
    return config, manifest, kernel, initrd


def inspect(args: argparse.Namespace) -> int:

    config, manifest, kernel, initrd = _domain_inputs(args)
    # --suspend keeps the guest paused for the whole check: the dump path; otherwise RAM is read in place
    report = inspect_domain_memory(
        args.domain,
        manifest,
        kernel,
        StateDir(config.state_dir).memory,
        initrd_path=initrd,
        suspend=args.suspend,
        method="dump" if args.suspend else "auto",
        marker_dir=hold_dir(config),
    )
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        if report.snapshot is not None:
            for proc in report.snapshot.processes:
                exe = proc.exe.path + (" (deleted)" if proc.exe.deleted else "") if proc.exe else "-"
                print(f"{proc.pid:>7} {proc.comm:16} {exe}")
        if report.unavailable:
            print(f"memory check unavailable: {report.unavailable}", file=sys.stderr)
        for finding in report.findings:
            print(f"finding: {finding.describe()}", file=sys.stderr)
    return EXIT_DENY if report.findings else EXIT_ALLOW


def baseline(args: argparse.Namespace) -> int:

    config, manifest, kernel, initrd = _domain_inputs(args)
    if kernel is None:
        raise ConfigError("give --kernel: the baseline is stored per kernel digest")
    conn = open_connection()
    try:
        result = record_vdso_baseline(
            args.domain, manifest, kernel, StateDir(config.state_dir).memory, conn=conn, initrd_path=initrd, disk=None
        )
    finally:
        conn.close()
    print(f"recorded the vDSO baseline from {args.domain}: {result}", file=sys.stderr)
    return EXIT_ALLOW


def check_config(args: argparse.Namespace) -> int:

    conn = open_connection()
    try:
        result = check(conn, args.name, fix=args.fix)
    finally:
        conn.close()
    for line in result.lines():
        print(line)
    return EXIT_ALLOW if result.ok else EXIT_DENY
