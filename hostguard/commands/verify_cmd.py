"""`hostguard verify`: exit 0 allow, 1 deny, 2 usage or configuration error.

`parse_simple_argv` reads the plain spellings of the command line without argparse (whose import and parser
set-up cost ~10 ms, half of a re-verification with warm caches). It returns None for anything else — help,
`--opt=value`, abbreviations, a repeated single-valued option, an option value that starts with "-", a
missing required option — and the caller lets argparse handle (and word the error for) those.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hostguard.errors import EXIT_ALLOW, HostguardError, VerificationError, printable
from hostguard.record import Record

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    import argparse
    import datetime as dt
    from collections.abc import Sequence

_SINGLE = {"--trust": "trust", "--kernel": "kernel", "--initrd": "initrd", "--state": "state", "--at": "at"}


class VerifyOptions(Record):
    envelope: str
    trust: str
    image: tuple[str, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    state: str | None = None
    at: str | None = None
    json: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> VerifyOptions:
        return cls(
            envelope=args.envelope,
            trust=args.trust,
            image=tuple(args.image),
            kernel=args.kernel,
            initrd=args.initrd,
            state=args.state,
            at=args.at,
            json=bool(args.json),
        )


def parse_simple_argv(argv: Sequence[str]) -> VerifyOptions | None:
    """The arguments after `verify`, when they are in the plain form argparse would read the same way."""
    values: dict[str, str] = {}
    images: list[str] = []
    envelope: str | None = None
    as_json = False
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--json":
            as_json = True
        elif word == "--image" or word in _SINGLE:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            value = argv[i + 1]
            i += 1
            if word == "--image":
                images.append(value)
            elif _SINGLE[word] in values:
                return None
            else:
                values[_SINGLE[word]] = value
        elif word.startswith("-") or envelope is not None:
            return None
        else:
            envelope = word
        i += 1
    if envelope is None or "trust" not in values:
        return None
    return VerifyOptions(
        envelope=envelope,
        trust=values["trust"],
        image=tuple(images),
        kernel=values.get("kernel"),
        initrd=values.get("initrd"),
        state=values.get("state"),
        at=values.get("at"),
        json=as_json,
    )


def verify(args: argparse.Namespace) -> int:
    return run(VerifyOptions.from_namespace(args))


def run(opts: VerifyOptions) -> int:
    import time

    # lazy: the cached `hostguard verify` must not pay for it
    from hostguard.host.verify_files import read_envelope, verify_files

    now: dt.datetime | float = time.time()
    if opts.at:
        # lazy: the cached `hostguard verify` must not pay for it
        from hostguard.signed.manifest import parse_time

        now = parse_time(opts.at, "--at")
    state = None
    try:
        if opts.state:
            # lazy: the cached `hostguard verify` must not pay for it
            from hostguard.host.state import StateStore

            state = StateStore(Path(opts.state))
        outcome = verify_files(
            read_envelope(Path(opts.envelope)),
            Path(opts.trust),
            now=now,
            state=state,
            images=[Path(p) for p in opts.image] if opts.image else None,
            kernel=Path(opts.kernel) if opts.kernel else None,
            initrd=Path(opts.initrd) if opts.initrd else None,
        )
    except HostguardError as exc:
        if opts.json:
            import json

            verdict = "deny" if isinstance(exc, VerificationError) else "error"
            json.dump({"verdict": verdict, "reason": str(exc)}, sys.stdout)
            sys.stdout.write("\n")
        raise
    finally:
        if state is not None:
            state.close()
    if opts.json:
        import json

        json.dump(outcome.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        signers = printable(", ".join(outcome.signer_subjects))  # certificate subjects: untrusted text
        print(f"allowed: {outcome.facts.label} signed by {signers}", file=sys.stderr)
    return EXIT_ALLOW
