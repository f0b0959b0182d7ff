"""The daemon's metrics in Prometheus text format (node-exporter textfile)."""

from __future__ import annotations

from pathlib import Path

from hostguard.host.config import Config
from hostguard.poststart.metrics import Metrics
from hostguard.poststart.verdicts import Verdict
from hostguard.signed.findings import UNEXPECTED, Finding


def test_verdicts_are_counted_in_the_textfile(tmp_path: Path) -> None:
    textfile = tmp_path / "hostguard.prom"
    config = Config({"trust": {"dir": "/t"}, "daemon": {"metrics_textfile": str(textfile)}}, tmp_path / "c.toml")
    metrics = Metrics(config)
    metrics.observe(Verdict("a", "u1", "pass", "none", "ok", "started", duration_ms=120.0))
    metrics.observe(
        Verdict("b", "u2", "fail", "pause", "bad", "interval", findings=(Finding(UNEXPECTED, "/x"),), duration_ms=5.0)
    )
    text = textfile.read_text()
    assert 'hostguard_checks_total{trigger="started"} 1.0' in text
    assert 'hostguard_verdicts_total{status="fail"} 1.0' in text
    assert 'hostguard_findings_total{kind="unexpected-executable"} 1.0' in text
    assert "hostguard_check_seconds_count 2.0" in text
