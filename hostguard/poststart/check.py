"""The post-start check of one running domain: compare what the host sees with what pre-boot verified.

Stages (each timed for the verdict):
- record: the hook's pre-boot record for this domain (which files were verified, by device and inode);
- hotplug: every disk of the live definition must be one pre-boot admitted (verified, host-made under a stack
  profile, or let through by the policy's allow-lists exactly as the hook lets it through);
- open-files: QEMU has open exactly the files the hook verified (device/inode through /proc/PID/fd), so no
  path was swapped between the hook's check and QEMU's open;
- block-graph: every node of QEMU's block graph and every file QEMU holds is one of those, or named by policy
  (hostguard.poststart.graph_stage; a file the stages above already reported is not reported twice).
Disk content and memory stages are added by hostguard.poststart.disk_stage / hostguard.memory when configured.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from hostguard.domain.record import DomainRecord, RecordedLayer
from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import ConfigError, CrlStateError, FormatError, HostguardError
from hostguard.host import libvirt
from hostguard.host.config import Config
from hostguard.host.libvirt import open_file_identities, qemu_pid
from hostguard.host.statedir import load_domain_record
from hostguard.poststart.context import CheckContext, Stage
from hostguard.poststart.disk_stage import stage_disk_content
from hostguard.poststart.graph_stage import REPORTED, stage_block_graph
from hostguard.poststart.memory_stage import stage_memory
from hostguard.poststart.verdicts import Verdict, summarize
from hostguard.signed.findings import CHECK_UNAVAILABLE, UNSIGNED_HOTPLUG, UNVERIFIED_OPEN, Finding


def stage_record(ctx: CheckContext) -> list[Finding]:
    try:
        ctx.record = load_domain_record(ctx.config.state_dir, ctx.uuid)
    except FormatError as exc:
        return [Finding(CHECK_UNAVAILABLE, ctx.name, "a readable pre-boot verification record", str(exc))]
    if ctx.record is None:
        return [Finding(UNVERIFIED_OPEN, ctx.name, "a pre-boot verification record", "none: started without the hook")]
    return []


def _recorded_layers(record: DomainRecord) -> dict[str, tuple[RecordedLayer, ...]]:
    return {d.target: d.layers for d in record.disks}


def _admitted_tops(record: DomainRecord) -> dict[str, str]:
    """Target -> the top file pre-boot let start there: a verified chain's top layer, or a host-made disk's."""
    tops = {d.target: d.layers[0].path for d in record.disks}
    for h in record.host_made or ():
        tops.setdefault(h.target, h.path)  # the hook records each host-made disk's layers top first
    return tops


def stage_hotplug(ctx: CheckContext) -> list[Finding]:
    """Every disk of the live definition is one pre-boot admitted: the top file of a verified or host-made disk
    at its target, or (no disk on record there) one the policy lets through unverified, asked exactly as the
    hook asks (`Config.admits_unverified`). Removable media are the block-graph stage's."""
    if ctx.record is None:
        return []
    spec = parse_domain_xml(ctx.live_xml)
    tops = _admitted_tops(ctx.record)
    findings: list[Finding] = []
    for disk in spec.disks:
        if disk.device not in ("disk", "lun") or disk.empty:
            continue
        top, path = tops.get(disk.target), disk.source.path
        if top is not None and top == path:
            continue
        if top is None and disk.device == "disk" and ctx.config.admits_unverified(disk.source.kind, path):
            continue
        found = path or f"a {disk.source.protocol or disk.source.kind} disk"
        findings.append(Finding(UNSIGNED_HOTPLUG, disk.target, top or "no disk at this target", found))
        if path is not None:
            ctx.extra.setdefault(REPORTED, set()).add(path)
    return findings


def stage_open_files(ctx: CheckContext) -> list[Finding]:

    if ctx.record is None:
        return []
    pid = qemu_pid(ctx.name)
    if pid is None:
        return [Finding(UNVERIFIED_OPEN, ctx.name, "a QEMU process", "no pid file")]
    open_ids = open_file_identities(pid)
    findings = []
    for target, layers in sorted(_recorded_layers(ctx.record).items()):
        for layer in layers:
            if (layer.dev, layer.ino) not in open_ids:
                ctx.extra.setdefault(REPORTED, set()).add(layer.path)
                findings.append(
                    Finding(
                        UNVERIFIED_OPEN,
                        layer.path,
                        f"QEMU holds the verified file ({target})",
                        "QEMU has a different file open, or none",
                    )
                )
    return findings


DEFAULT_STAGES: tuple[tuple[str, Stage], ...] = (
    ("record", stage_record),
    ("hotplug", stage_hotplug),
    ("open-files", stage_open_files),
    ("block-graph", stage_block_graph),
    ("disk-content", stage_disk_content),
    ("memory", stage_memory),
)


def _instance(dom: libvirt.Domain) -> int:
    """This run of the domain: libvirt gives each start a new id."""
    try:
        return int(dom.ID())
    except libvirt.libvirtError:
        return -1


def _still_running(dom: libvirt.Domain, instance: int) -> bool:
    try:
        now = dom.connect().lookupByUUIDString(dom.UUIDString())
        return bool(now.isActive()) and int(now.ID()) == instance
    except libvirt.libvirtError as exc:
        # Only "no such domain" says it is gone; libvirtd unreachable says nothing: the action is tried as is.
        return bool(exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN)


def check_domain(
    config: Config, dom: libvirt.Domain, trigger: str, stages: tuple[tuple[str, Stage], ...] = DEFAULT_STAGES
) -> Verdict:
    """Run every stage; return the verdict with the action policy asks for (not yet applied)."""
    started = time.monotonic()
    name, uuid = dom.name(), dom.UUIDString()
    instance = _instance(dom)
    timings: dict[str, float] = {}
    stats: dict[str, Any] = {}
    findings: list[Finding] = []
    try:
        ctx = CheckContext(config, dom, name, uuid, dom.XMLDesc(0).encode())
        for stage_name, stage in stages:
            t = time.monotonic()
            findings.extend(stage(ctx))
            timings[stage_name] = (time.monotonic() - t) * 1000
        policy = config.finding_policy()
        filtered = policy.filter(findings)
        # A memory check that could not run (no kernel up yet, no BTF), where policy only logs that, is a note
        # on the verdict, not a failure. A disk check that could not run stays a finding: its verdict is "fail".
        notes = tuple(
            f
            for f in filtered
            if f.kind == CHECK_UNAVAILABLE and f.path.startswith("memory") and policy.actions[f.kind] == "log"
        )
        kept = tuple(f for f in filtered if f not in notes)
        notes += tuple(ctx.notes)  # not read by design (a swap disk, a config drive): no finding to filter
        action = policy.action_for(kept)
        status = "pass" if not kept else "fail"
        ran = ", ".join(stage for stage in timings if stage not in ctx.skipped)
        off = "".join(f"; {stage} check off in the configuration" for stage in ctx.skipped)
        reason = (summarize(kept) if kept else f"no findings ({ran} checked)") + off
        stats = _json_safe({k: v for k, v in ctx.extra.items() if k != REPORTED})
        if notes:
            reason += "; not checked: " + "; ".join(str(f.found or f.path) for f in notes)
    except (ConfigError, CrlStateError) as exc:
        # The host's own set-up failed (trust store, its CRLs out of date, configuration, state directory): that
        # is no evidence about the guest, so by default nothing is done to it (`on_host_error`, ADR 0011, 0024).
        kept, notes, status, action = (), (), "error", config.on_host_error
        reason = f"host error, the guest was not judged: {exc}"
    except (HostguardError, libvirt.libvirtError, OSError) as exc:
        kept, notes, status = (), (), "error"
        if isinstance(exc, libvirt.libvirtError) and libvirt.connection_lost(dom.connect()):
            # libvirtd went away or stopped answering mid-check: no evidence about the guest (ADR 0024).
            action, reason = config.on_host_error, f"host error, the guest was not judged: libvirtd: {exc}"
        else:
            # An error is not a pass: the policy's action applies (fail closed), the reason says why.
            action, reason = config.action, f"check failed: {exc}"
    except Exception as exc:  # a bug in a stage must not mean "pass": fail closed, logged with its traceback
        logging.getLogger(__name__).exception("post-start check of %s failed unexpectedly", name)
        kept, notes, status, action = (), (), "error", config.action
        reason = f"check failed: internal error ({type(exc).__name__}); see the daemon's log"
    if status == "fail" and libvirt.connection_lost(dom.connect()):
        # libvirtd went away while the stages read: what they could not find (a pid file of a domain destroyed
        # meanwhile) is no evidence, and nothing can act on the domain now; the reconnect re-checks every domain.
        kept, status, action = (), "error", config.on_host_error
        reason = f"host error, the guest was not judged: libvirtd went away during the check ({reason})"
    if status != "pass" and not _still_running(dom, instance):
        # Destroyed (or stopped and started again) while checked: what could not be read is no finding, and
        # there is nothing left to act on. Real findings stay on record.
        if all(f.kind == CHECK_UNAVAILABLE for f in kept):
            status = "gone"
        action = "none"
        reason = f"the domain stopped while it was checked: {reason}"
    return Verdict(
        domain=name,
        uuid=uuid,
        status=status,
        action=action,
        reason=reason,
        trigger=trigger,
        findings=kept,
        notes=notes,
        duration_ms=(time.monotonic() - started) * 1000,
        stages_ms=timings,
        stats=stats,
    )


def _json_safe(extra: dict[str, Any]) -> dict[str, Any]:
    """What stages counted (disk stage mode and sizes, memory read method and bytes), as the verdict keeps it.
    Statistics only: whatever they hold, they never turn a check into an error."""
    try:
        safe: dict[str, Any] = json.loads(json.dumps(extra, default=str))
    except (TypeError, ValueError, RecursionError) as exc:
        return {"unrecorded": f"{type(exc).__name__}: {exc}"[:200]}
    return safe
