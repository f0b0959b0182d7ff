"""What every post-start stage gets: the domain being checked and what earlier stages learned about it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hostguard.domain.record import DomainRecord
from hostguard.host.config import Config
from hostguard.host.libvirt import Domain
from hostguard.record import Record, field
from hostguard.signed.findings import Finding


class CheckContext(Record, frozen=False):
    config: Config
    dom: Domain
    name: str
    uuid: str
    live_xml: bytes
    record: DomainRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # What a stage did not read and why, when that is by design rather than a failure (e.g. a swap disk): it goes
    # on the verdict's notes, never through the finding policy.
    notes: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # stages turned off by the configuration (not "checked")


Stage = Callable[[CheckContext], list[Finding]]
