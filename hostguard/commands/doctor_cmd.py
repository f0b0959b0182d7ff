"""`hostguard doctor`: one line per check (ok / warn / fail, and what to do); exit 0 all ok or warnings,
1 a check failed, 2 the configuration cannot be loaded (the checks that need it were skipped)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hostguard.errors import EXIT_ALLOW, EXIT_DENY, EXIT_USAGE
from hostguard.host.doctor import FAIL, HostView, run_checks


def doctor(args: argparse.Namespace) -> int:
    view = HostView(hooks_dir=Path(args.hooks_dir))
    checks, config_loaded = run_checks(view, Path(args.config) if args.config else None)
    code = EXIT_USAGE if not config_loaded else EXIT_DENY if any(c.status == FAIL for c in checks) else EXIT_ALLOW
    if args.json:
        json.dump({"exit": code, "checks": [c.to_json() for c in checks]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return code
    for c in checks:
        line = f"{c.status:4}  {c.name}: {c.message}"
        print(f"{line}\n      -> {c.action}" if c.action else line)
    return code
