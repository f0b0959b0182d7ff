"""Post-start verdicts: what the daemon found, kept where admins look.

Each verdict goes to the domain's libvirt `<metadata>` (namespace VERDICT_NS, so it never replaces the
image binding under the domain namespace; `virsh metadata DOMAIN --uri VERDICT_NS`), to the audit log, and to
a JSON file in the state directory (`verdicts/UUID.json`, written atomically), which survives `virsh destroy`
and feeds `hostguard status`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from hostguard.host.fsutil import atomic_write
from hostguard.host.statedir import StateDir
from hostguard.record import Record, field
from hostguard.signed.findings import Finding

VERDICT_NS = "https://hostguard.dev/xmlns/verdict/1"
VERDICT_PREFIX = "hgv"
STATUSES = ("pass", "fail", "error", "gone")  # gone: the domain stopped while it was checked


class Verdict(Record):
    domain: str
    uuid: str
    status: str  # pass | fail | error | gone
    action: str  # none | log | pause | destroy (what was done)
    reason: str
    trigger: str
    findings: tuple[Finding, ...] = ()
    notes: tuple[Finding, ...] = ()  # checks that could not run, which policy only logs
    checked_at: float = field(default_factory=time.time)
    duration_ms: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # per stage: what it read and how (JSON values)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "uuid": self.uuid,
            "status": self.status,
            "action": self.action,
            "reason": self.reason,
            "trigger": self.trigger,
            "findings": [f.to_json() for f in self.findings],
            "notes": [f.to_json() for f in self.notes],
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checked_at)),
            "duration_ms": round(self.duration_ms, 1),
            "stages_ms": {k: round(v, 1) for k, v in self.stages_ms.items()},
            "stats": self.stats,
        }

    def metadata_xml(self) -> str:
        checked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checked_at))
        return (
            f"<verdict status={quoteattr(self.status)} checked={quoteattr(checked)} "
            f"findings='{len(self.findings)}' action={quoteattr(self.action)} "
            f"reason={quoteattr(self.reason[:300])}/>"
        )


def summarize(findings: tuple[Finding, ...], limit: int = 3) -> str:
    if not findings:
        return "no findings"
    head = "; ".join(f.describe() for f in findings[:limit])
    more = f" (+{len(findings) - limit} more)" if len(findings) > limit else ""
    return f"{len(findings)} finding(s): {head}{more}"


def save_verdict(state_dir: Path, verdict: Verdict) -> None:
    paths = StateDir(state_dir)
    paths.verdicts.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(paths.verdict_path(verdict.uuid), json.dumps(verdict.to_json(), indent=1).encode(), mode=0o600)


def _load_dir(directory: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a torn file cannot exist (atomic writes); an unreadable one is skipped, not fatal
        if isinstance(doc, dict):
            out[path.stem] = doc
    return out


def load_verdicts(state_dir: Path) -> dict[str, dict[str, Any]]:
    return _load_dir(StateDir(state_dir).verdicts)
