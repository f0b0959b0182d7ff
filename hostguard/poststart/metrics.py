"""The daemon's counters and durations in Prometheus text format (a node-exporter textfile and/or a loopback
port). prometheus_client is imported only when a daemon starts."""

from __future__ import annotations

from hostguard.host.config import Config
from hostguard.poststart.verdicts import Verdict


class Metrics:
    """Counters and durations, exposed in Prometheus text format (textfile and/or loopback port)."""

    def __init__(self, config: Config) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.checks = Counter("hostguard_checks", "Post-start checks run", ["trigger"], registry=self.registry)
        self.verdicts = Counter("hostguard_verdicts", "Verdicts by status", ["status"], registry=self.registry)
        self.findings = Counter("hostguard_findings", "Findings by kind", ["kind"], registry=self.registry)
        self.duration = Histogram("hostguard_check_seconds", "Check duration", registry=self.registry)
        self.textfile = config.metrics_textfile
        if config.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(config.metrics_port, addr="127.0.0.1", registry=self.registry)

    def observe(self, verdict: Verdict) -> None:
        self.checks.labels(verdict.trigger).inc()
        self.verdicts.labels(verdict.status).inc()
        for f in verdict.findings:
            self.findings.labels(f.kind).inc()
        self.duration.observe(verdict.duration_ms / 1000)
        if self.textfile is not None:
            from prometheus_client import write_to_textfile

            write_to_textfile(str(self.textfile), self.registry)
