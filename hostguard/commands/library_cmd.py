"""`hostguard library ...` and `hostguard domain create`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hostguard.errors import EXIT_ALLOW, EXIT_DENY, UsageError, printable
from hostguard.host.config import load_config
from hostguard.host.libvirt import open_connection
from hostguard.host.oci import parse_reference
from hostguard.library.domaincreate import DEFAULT_CMDLINE, create_domain
from hostguard.library.oci import pull as pull_image
from hostguard.library.oci import push as push_image
from hostguard.library.oci import sync as sync_library
from hostguard.library.pool import Library


def _library(args: argparse.Namespace) -> Library:

    return Library(load_config(Path(args.config) if args.config else None))


def add(args: argparse.Namespace) -> int:
    if (args.kernel is None) != (args.initrd is None):
        raise UsageError("give --kernel and --initrd together")
    entry = _library(args).add(
        Path(args.image),
        Path(args.envelope),
        name=args.name,
        kernel=Path(args.kernel) if args.kernel else None,
        initrd=Path(args.initrd) if args.initrd else None,
    )
    signers = printable(", ".join(entry["signers"]))  # certificate subjects: untrusted text
    print(f"added {entry['name']}: {entry['image']} v{entry['version']} signed by {signers}", file=sys.stderr)
    return EXIT_ALLOW


def list_(args: argparse.Namespace) -> int:
    lib = _library(args)
    entries = [lib.index(n) for n in lib.names()]
    if args.json:
        json.dump(entries, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_ALLOW
    print(f"{'NAME':28} {'VERSION':7} {'SIZE':>10} {'EXPIRES':20} {'VERIFIED':20} {'STATUS':7} SIGNER")
    for e in entries:
        print(
            f"{e['name'][:28]:28} {e.get('version', '?')!s:7} {e.get('size', 0):>10} {e.get('expires', '?'):20} "
            f"{e.get('verified_at', '?'):20} {e.get('status', '?'):7} {printable(', '.join(e.get('signers', [])))}"
        )
    return EXIT_ALLOW


def show(args: argparse.Namespace) -> int:
    lib = _library(args)
    src = lib.source(args.name)
    entry = lib.index(args.name)
    entry.update(
        path=str(src.image),
        envelope=str(src.envelope),
        kernel=str(src.kernel) if src.kernel else None,
        initrd=str(src.initrd) if src.initrd else None,
        used_by=lib.users(src),
    )
    json.dump(entry, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return EXIT_ALLOW


def verify(args: argparse.Namespace) -> int:
    lib = _library(args)
    names = [args.name] if args.name else lib.names()
    failed = 0
    for name in names:
        entry = lib.verify(name)
        if entry["status"] == "ok":
            print(f"ok      {name}", file=sys.stderr)
        else:
            failed += 1
            print(f"FAILED  {name}: {entry['reason']}", file=sys.stderr)
    return EXIT_DENY if failed else EXIT_ALLOW


def remove(args: argparse.Namespace) -> int:
    _library(args).remove(args.name, force=args.force)
    print(f"removed {args.name}", file=sys.stderr)
    return EXIT_ALLOW


def push(args: argparse.Namespace) -> int:

    target = parse_reference(args.target, require_tag=True)
    if target.digest is not None:
        raise UsageError("push to a tag (oci://REGISTRY/REPOSITORY:TAG): the digest is the registry's to compute")
    result = push_image(
        Path(args.image),
        Path(args.envelope),
        target,
        kernel=Path(args.kernel) if args.kernel else None,
        initrd=Path(args.initrd) if args.initrd else None,
        insecure=args.insecure,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"pushed {result['image']} v{result['version']} to {args.target} ({result['digest']})", file=sys.stderr)
        print(f"oci://{target.registry}/{target.repository}@{result['digest']}")
    return EXIT_ALLOW


def pull(args: argparse.Namespace) -> int:

    source = parse_reference(args.source)
    entry = pull_image(_library(args), source, name=args.name, insecure=args.insecure, progress=not args.json)
    if args.json:
        print(json.dumps(entry, indent=1))
    else:
        signers = printable(", ".join(entry["signers"]))
        resumed = f", resumed at byte {entry['resumed_from']}" if entry["resumed_from"] else ""
        print(
            f"pulled {entry['name']}: {entry['image']} v{entry['version']} signed by {signers} "
            f"({entry['digest']}{resumed})",
            file=sys.stderr,
        )
    return EXIT_ALLOW


def sync(args: argparse.Namespace) -> int:

    results = sync_library(_library(args), parse_reference(args.source, bare=True), insecure=args.insecure)
    failed = sum(r["status"] in ("failed", "refused") for r in results)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            what = f"{r['image']} v{r['version']}" if "image" in r else f"tag {r['tag']}"
            reason = f": {printable(r['reason'])}" if r.get("reason") else ""
            print(f"{r['status']:10} {what}{reason}", file=sys.stderr)
    return EXIT_DENY if failed else EXIT_ALLOW


def domain_create(args: argparse.Namespace) -> int:

    lib = _library(args)
    src = lib.source(args.image)
    entry = lib.index(args.image)
    conn = open_connection()
    try:
        overlay = create_domain(
            conn,
            args.name,
            src,
            image_name=str(entry.get("image", args.image)),
            images_dir=Path(args.images_dir),
            memory_mib=args.memory,
            vcpus=args.vcpus,
            kernel_boot=args.kernel_boot,
            cmdline=args.cmdline or DEFAULT_CMDLINE,
            network=args.network,
        )
    finally:
        conn.close()
    print(f"defined {args.name} on {src.image} (overlay {overlay})", file=sys.stderr)
    print(f"virsh start {args.name}")
    return EXIT_ALLOW
