"""The memory stage of the post-start check: what really runs in the guest, from its RAM read in place
(a memory-only dump only as a fallback, noted in the verdict).

Processes' executables and loaded modules must be manifest entries (same path, and the same inode as the
verified image holds); an ELF in guest memory that matches no manifest file is a finding too. The facts about
the verified image's files (inodes, first pages) are read from the signed base image itself, after checking it
is still the file the hook verified.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hostguard.domain.record import DomainRecord
from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import HostguardError
from hostguard.host import libvirt
from hostguard.imagefs.readers import open_reader
from hostguard.memory.diskref import disk_facts
from hostguard.memory.hold import release_abandoned_holds
from hostguard.memory.inspect import inspect_domain_memory
from hostguard.poststart.context import CheckContext
from hostguard.poststart.reverify import load_verified_manifest
from hostguard.signed.findings import Finding

log = logging.getLogger(__name__)


def _disk_facts(record: DomainRecord, manifest: Any) -> Any:
    """DiskFacts from the verified base image, or None (the ELF scan then says it is unavailable)."""

    if not record.disks:
        return None
    layer = record.disks[0].signed_layer()
    path, fmt, dev, ino = Path(layer.path), layer.format, layer.dev, layer.ino
    try:
        st = os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (dev, ino):
            log.warning("%s is no longer the file the hook verified: not used for memory facts", path)
            return None
        with open_reader([(path, fmt)], "fast") as reader:
            return disk_facts(reader, manifest)
    except (OSError, HostguardError) as exc:
        log.info("no disk facts for the memory check from %s: %s", path, exc)
        return None


def hold_dir(config: Any) -> Path:
    """Where a memory check marks a guest it paused for its walk: next to the daemon's socket, in /run (tmpfs:
    the markers matter only while the host runs, and nothing of the check is written to disk)."""
    return Path(config.daemon_socket).parent / "memory-holds"


def release_memory_holds(config: Any, conn: libvirt.Connection) -> list[str]:
    """Resume guests a killed memory check left paused. The daemon calls this once it is connected to
    libvirt, before its first check (every memory stage also does, for the guests it is about to look at)."""

    return release_abandoned_holds(conn, hold_dir(config))


def stage_memory(ctx: CheckContext) -> list[Finding]:

    if not ctx.config.memory_check:
        ctx.skipped.append("memory")
        return []
    if ctx.record is None:
        return []  # the record stage reported it
    manifest = load_verified_manifest(ctx.config, Path(ctx.record.primary_envelope()))
    spec = parse_domain_xml(ctx.live_xml)
    report = inspect_domain_memory(
        ctx.name,
        manifest,
        Path(spec.os.kernel) if spec.os.kernel else None,
        ctx.config.state_dir / "memory",
        conn=ctx.dom.connect(),
        initrd_path=Path(spec.os.initrd) if spec.os.initrd else None,
        disk=_disk_facts(ctx.record, manifest),
        marker_dir=hold_dir(ctx.config),
    )
    ctx.extra["memory"] = {
        **report.timings,
        "method": report.method,
        "bytes_read": report.bytes_read,
        "bytes_written": report.dump_bytes,
        # ELF header pages not judged because the guest kernel uses them as slab or has them free
        **{f"elf_pages_{use}": n for use, n in report.unjudged_elf_pages().items()},
    }
    return list(report.findings)
