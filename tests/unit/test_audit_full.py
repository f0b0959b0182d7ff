"""The audit log on a full disk: the write says it failed (the hook then denies the start it cannot record), and a
line cut short is taken back so the log stays whole JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hostguard.host.audit import write_audit

# A child whose files may not grow past LIMIT bytes (the kernel's short write, then EFBIG: what a disk that fills
# during the write looks like to the writer).
CHILD = """
import json, resource, signal, sys
from pathlib import Path
from hostguard.host.audit import write_audit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
print(json.dumps(write_audit(Path(sys.argv[1]), {"domain": "web2", "verdict": "allow", "pad": "x" * 200},
                             to_syslog=False)))
"""


def test_a_line_that_does_not_fit_is_taken_back_and_reported(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    assert write_audit(log, {"domain": "web1", "verdict": "allow"}, to_syslog=False) is None
    before = log.read_bytes()
    limit = len(before) + 100  # room for a part of the next line only
    out = subprocess.run([sys.executable, "-c", CHILD, str(log), str(limit)], capture_output=True, text=True)
    problem = json.loads(out.stdout)
    assert problem == f"cannot write audit log {log}: No space left on device (the line did not fit)", out.stderr
    assert log.read_bytes() == before  # no torn line for the next writer to append to
    assert write_audit(log, {"domain": "web3", "verdict": "deny"}, to_syslog=False) is None
    assert [json.loads(line)["domain"] for line in log.read_text().splitlines()] == ["web1", "web3"]


def test_a_full_device_is_reported(tmp_path: Path) -> None:
    assert write_audit(Path("/dev/full"), {"domain": "web1"}, to_syslog=False) == (
        "cannot write audit log /dev/full: No space left on device"
    )
