"""The post-start check of one running domain: compare what the host sees with what pre-boot verified.

Stages (each timed for the verdict):
- record: the hook's pre-boot record for this domain (which files were verified, by device and inode);
- hotplug: every disk of the live definition must be one pre-boot verified (or, hot-plugged since, be
  signed itself: it is verified now the same way);
- open-files: QEMU has open exactly the files the hook verified (device/inode through /proc/PID/fd), so no
  path was swapped between the hook's check and QEMU's open.
Disk content and memory stages are added by hostguard.poststart.disk_stage / hostguard.memory when configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostguard.errors import ConfigError, HostguardError
from hostguard.host.config import Config
from hostguard.poststart.verdicts import Verdict, load_domain_records, summarize
from hostguard.signed.findings import CHECK_UNAVAILABLE, UNSIGNED_HOTPLUG, UNVERIFIED_OPEN, Finding, finding_policy

Stage = Callable[["CheckContext"], list[Finding]]


@dataclass
class CheckContext:
    config: Config
    dom: Any
    name: str
    uuid: str
    live_xml: bytes
    record: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def stage_record(ctx: CheckContext) -> list[Finding]:
    ctx.record = load_domain_records(ctx.config.state_dir).get(ctx.uuid)
    if ctx.record is None:
        return [Finding(UNVERIFIED_OPEN, ctx.name, "a pre-boot verification record", "none: started without the hook")]
    return []


def _recorded_layers(record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {str(d["target"]): list(d["layers"]) for d in record.get("disks", [])}


def stage_hotplug(ctx: CheckContext) -> list[Finding]:
    from hostguard.domain.xmlparse import parse_domain_xml

    if ctx.record is None:
        return []
    spec = parse_domain_xml(ctx.live_xml)
    recorded = _recorded_layers(ctx.record)
    findings: list[Finding] = []
    for disk in spec.disks:
        if disk.device != "disk" or disk.empty:
            continue
        layers = recorded.get(disk.target)
        if layers is None:
            findings.append(Finding(UNSIGNED_HOTPLUG, disk.target, "no disk at this target", disk.source.path))
        elif layers and layers[0]["path"] != disk.source.path:
            findings.append(Finding(UNSIGNED_HOTPLUG, disk.target, layers[0]["path"], disk.source.path))
    return findings


def stage_open_files(ctx: CheckContext) -> list[Finding]:
    from hostguard.host.libvirt import open_file_identities, qemu_pid

    if ctx.record is None:
        return []
    pid = qemu_pid(ctx.name)
    if pid is None:
        return [Finding(UNVERIFIED_OPEN, ctx.name, "a QEMU process", "no pid file")]
    open_ids = open_file_identities(pid)
    findings = []
    for target, layers in sorted(_recorded_layers(ctx.record).items()):
        for layer in layers:
            if (int(layer["dev"]), int(layer["ino"])) not in open_ids:
                findings.append(
                    Finding(
                        UNVERIFIED_OPEN,
                        str(layer["path"]),
                        f"QEMU holds the verified file ({target})",
                        "QEMU has a different file open, or none",
                    )
                )
    return findings


def _stage_disk_content(ctx: CheckContext) -> list[Finding]:
    from hostguard.poststart.disk_stage import stage_disk_content

    return stage_disk_content(ctx)


def _stage_memory(ctx: CheckContext) -> list[Finding]:
    from hostguard.poststart.memory_stage import stage_memory

    return stage_memory(ctx)


DEFAULT_STAGES: tuple[tuple[str, Stage], ...] = (
    ("record", stage_record),
    ("hotplug", stage_hotplug),
    ("open-files", stage_open_files),
    ("disk-content", _stage_disk_content),
    ("memory", _stage_memory),
)


def _instance(dom: Any) -> int:
    """This run of the domain: libvirt gives each start a new id."""
    import libvirt

    try:
        return int(dom.ID())
    except libvirt.libvirtError:
        return -1


def _still_running(dom: Any, instance: int) -> bool:
    import libvirt

    try:
        now = dom.connect().lookupByUUIDString(dom.UUIDString())
        return bool(now.isActive()) and int(now.ID()) == instance
    except libvirt.libvirtError as exc:
        # Only "no such domain" says it is gone; libvirtd unreachable says nothing: the action is tried as is.
        return bool(exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN)


def check_domain(
    config: Config, dom: Any, trigger: str, stages: tuple[tuple[str, Stage], ...] = DEFAULT_STAGES
) -> Verdict:
    """Run every stage; return the verdict with the action policy asks for (not yet applied)."""
    import libvirt

    started = time.monotonic()
    name, uuid = dom.name(), dom.UUIDString()
    instance = _instance(dom)
    timings: dict[str, float] = {}
    findings: list[Finding] = []
    try:
        ctx = CheckContext(config, dom, name, uuid, dom.XMLDesc(0).encode())
        for stage_name, stage in stages:
            t = time.monotonic()
            findings.extend(stage(ctx))
            timings[stage_name] = (time.monotonic() - t) * 1000
        policy = finding_policy(config.action, config.finding_actions, config.finding_allow)
        filtered = policy.filter(findings)
        # A memory check that could not run (no kernel up yet, no BTF), where policy only logs that, is a note
        # on the verdict, not a failure. A disk check that could not run stays a finding: its verdict is "fail".
        notes = tuple(
            f
            for f in filtered
            if f.kind == CHECK_UNAVAILABLE and f.path.startswith("memory") and policy.actions[f.kind] == "log"
        )
        kept = tuple(f for f in filtered if f not in notes)
        action = policy.action_for(kept)
        status = "pass" if not kept else "fail"
        reason = summarize(kept) if kept else f"no findings ({', '.join(timings)} checked)"
        if notes:
            reason += "; not checked: " + "; ".join(str(f.found or f.path) for f in notes)
    except ConfigError as exc:
        # The host's own set-up failed (trust store, configuration, state directory): that is no evidence
        # about the guest, so by default nothing is done to it (`on_host_error`, ADR 0011).
        kept, notes, status, action = (), (), "error", config.on_host_error
        reason = f"host error, the guest was not judged: {exc}"
    except (HostguardError, libvirt.libvirtError, OSError) as exc:
        # An error is not a pass: the policy's action applies (fail closed), the reason says why.
        kept, notes, status, action = (), (), "error", config.action
        reason = f"check failed: {exc}"
    except Exception as exc:  # a bug in a stage must not mean "pass": fail closed, logged with its traceback
        logging.getLogger(__name__).exception("post-start check of %s failed unexpectedly", name)
        kept, notes, status, action = (), (), "error", config.action
        reason = f"check failed: internal error ({type(exc).__name__}); see the daemon's log"
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
    )
