"""Package the guest agent as one self-contained file: a reproducible zipapp of the protocol core.

The zipapp holds exactly `BUNDLE_FILES` (stdlib + cryptography are all they import), so the code a guest runs
is the code the host's tests exercise, byte for byte. `python3 hostguard-guest.pyz --help` runs it.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import hostguard
from hostguard.host.fsutil import atomic_write

BUNDLE_FILES = (
    "hostguard/__init__.py",
    "hostguard/errors.py",
    "hostguard/strictjson.py",
    "hostguard/record.py",
    "hostguard/owner/__init__.py",
    "hostguard/owner/names.py",
    "hostguard/owner/tokens.py",
    "hostguard/owner/protocol.py",
    "hostguard/owner/tlschannel.py",
    "hostguard/owner/session.py",
    "hostguard/owner/guest_agent.py",
)
MAIN = b"import sys\n\nfrom hostguard.owner.guest_agent import main\n\nsys.exit(main())\n"
DEFAULT_INTERPRETER = "/usr/bin/python3"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def source_root() -> Path:
    return Path(hostguard.__file__).resolve().parent.parent


def bundle_bytes(interpreter: str = DEFAULT_INTERPRETER) -> bytes:
    """The zipapp as bytes (same inputs, same bytes)."""
    import io

    root = source_root()
    out = io.BytesIO()
    out.write(b"#!" + interpreter.encode() + b"\n")
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [("__main__.py", MAIN)] + [(rel, (root / rel).read_bytes()) for rel in BUNDLE_FILES]:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return out.getvalue()


def build_agent(path: Path, interpreter: str = DEFAULT_INTERPRETER) -> str:
    """Write the agent to `path` (mode 0755) and return its sha256 hex digest."""
    data = bundle_bytes(interpreter)
    atomic_write(path, data, mode=0o755)  # a program, meant to be run by anyone
    return hashlib.sha256(data).hexdigest()
