"""`hostguard verify`: exit 0 allow, 1 deny, 2 usage or configuration error."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from hostguard.errors import EXIT_ALLOW, HostguardError, VerificationError
from hostguard.manifest import parse_time


def verify(args: argparse.Namespace) -> int:
    from hostguard.imageverify import read_envelope, verify_files

    now = parse_time(args.at, "--at") if args.at else dt.datetime.now(dt.UTC)
    state = None
    try:
        if args.state:
            from hostguard.state import StateStore

            state = StateStore(Path(args.state))
        outcome = verify_files(
            read_envelope(Path(args.envelope)),
            Path(args.trust),
            now=now,
            state=state,
            images=[Path(p) for p in args.image] if args.image else None,
            kernel=Path(args.kernel) if args.kernel else None,
            initrd=Path(args.initrd) if args.initrd else None,
        )
    except HostguardError as exc:
        if args.json:
            verdict = "deny" if isinstance(exc, VerificationError) else "error"
            json.dump({"verdict": verdict, "reason": str(exc)}, sys.stdout)
            sys.stdout.write("\n")
        raise
    finally:
        if state is not None:
            state.close()
    if args.json:
        json.dump(outcome.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        signers = ", ".join(outcome.signer_subjects)
        print(f"allowed: {outcome.manifest.image} signed by {signers}", file=sys.stderr)
    return EXIT_ALLOW
