"""The pre-boot decision for one domain: every disk and boot file must be the signed one, and nothing else on
the host may be handed to the guest unless the policy allows it.

Input is the domain XML libvirt hands the hook (hostile until parsed) and the host configuration; output is
an allow (with what was verified, for audit and for the daemon) or a VerificationError naming the first
problem. Backing chains are read from the qcow2 headers; a chain the XML gives (`<backingStore>`, which
libvirt hands to QEMU instead of probing) must agree with them layer by layer, path and format. Every layer is
opened with O_NOFOLLOW and hashed through that descriptor, and its (device, inode) is remembered so the daemon
can later check that QEMU opened the same files. All disks and boot files of a domain come from one signed
image unless `[policy] allow_image_combinations` names the mix. Host inputs other than disks (shared
filesystems, passed-through devices, ACPI tables, fw_cfg blobs, file-backed memory, the emulator, the kernel
command line, boot order, nvram) are checked by `hostguard.preboot.hostinputs`.

Everything here runs on every VM start, so nothing heavy is imported: the domain XML parse is memoized in the
state store (lxml is imported only on a miss), and a cached verdict needs no cryptography.
"""

from __future__ import annotations

import os
import stat
from contextlib import ExitStack
from pathlib import Path

from hostguard.domain.record import (
    DomainRecord,
    RecordedDisk,
    RecordedFile,
    RecordedHostMade,
    RecordedImage,
    RecordedLayer,
)
from hostguard.domain.xmlparse import DiskSpec, DomainSpec
from hostguard.errors import ConfigError, DomainError, FormatError, ImageError
from hostguard.host.digest import Digested, FileIdentity, digest_fd, open_image
from hostguard.host.state import StateStore
from hostguard.host.statedir import load_domain_record
from hostguard.host.verify_files import Outcome, read_envelope, verify_files
from hostguard.preboot.hostinputs import check_cmdline, check_host_inputs
from hostguard.preboot.overlays import overlays_written
from hostguard.preboot.parsecache import parse_domain_xml_cached
from hostguard.record import Record

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator, Sequence
    from typing import Any

    from hostguard.host.config import Config
    from hostguard.host.trustdir import TrustDirFiles

MAX_CHAIN = 8
ENVELOPE_SUFFIX = ".hgsig"
REWARM_MAX_BYTES = 256 * 1024 * 1024


class Layer(Record):
    path: Path
    format: str
    identity: FileIdentity
    role: str  # "overlay" | "signed"


class DiskPlan:
    """What one disk needs verified: its layers (top first), the signed layer's digest and its envelope."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.layers: list[Layer] = []
        self.envelope: Path | None = None
        self.expected_name: str | None = None
        self.digested: Digested | None = None
        self.host_made: str | None = None  # what the stack profile allowed it as (hostguard.preboot.hostmade)
        self.written = False  # an overlay holds data: its content is checked before boot (preboot.overlays)


class Decision:
    def __init__(
        self,
        domain: DomainSpec,
        outcomes: tuple[tuple[Path, Outcome], ...] = (),
        disks: tuple[DiskPlan, ...] = (),
        exempt_by: str | None = None,
        notes: tuple[str, ...] = (),
        *,
        host_made: tuple[DiskPlan, ...] = (),
        trust_store: str | None = None,
    ) -> None:
        self.domain = domain
        self.outcomes = outcomes
        self.disks = disks
        self.exempt_by = exempt_by
        self.notes = notes
        self.host_made = host_made  # disks the stack profile allowed unsigned (recorded for the block-graph stage)
        self.trust_store = trust_store  # fingerprint of the trust directory's bytes the decision was made under

    def boot_files(self) -> list[Digested]:
        return [d for _, o in self.outcomes for d in o.boot]

    def summary(self) -> dict[str, Any]:
        images = [
            {
                "envelope": str(env),
                "image": o.facts.name,
                "version": o.facts.version,
                "signers": list(o.signer_subjects),
            }
            for env, o in self.outcomes
        ]
        # How each signed file's digest was had: hashed now, "cached" by identity, or "kept" by hostguardd (ADR 0021).
        digested = [d.digested for d in self.disks if d.digested is not None] + self.boot_files()
        digests = [{"path": str(d.path), "from": _digest_source(d)} for d in digested]
        summary: dict[str, Any] = {"images": images, "notes": list(self.notes), "digests": digests}
        if self.trust_store is not None:
            summary["trust_store"] = self.trust_store
        return summary

    def domain_record(self) -> DomainRecord:
        """What the daemon needs later: which files were verified, by identity."""
        return DomainRecord(
            name=self.domain.name,
            uuid=self.domain.uuid,
            images=tuple(
                RecordedImage(str(env), o.facts.name, o.facts.version, tuple(o.signer_subjects))
                for env, o in self.outcomes
            ),
            notes=self.notes,
            disks=tuple(
                RecordedDisk(
                    d.target,
                    str(d.envelope),
                    tuple(
                        RecordedLayer(str(x.path), x.format, x.identity.dev, x.identity.ino, x.role) for x in d.layers
                    ),
                )
                for d in self.disks
            ),
            boot=tuple(RecordedFile(str(d.path), d.identity.dev, d.identity.ino) for d in self.boot_files()),
            host_made=tuple(
                RecordedHostMade(d.target, d.host_made or "", str(x.path), x.identity.dev, x.identity.ino)
                for d in self.host_made
                for x in d.layers
            ),
        )


def _digest_source(d: Digested) -> str:
    return "kept" if d.kept else "cached" if d.cached else "hashed"


Refs = tuple[Path | None, dict[str, tuple[Path, str | None]], str | None]


def _envelope_refs(spec: DomainSpec) -> Refs:
    domain_wide: Path | None = None
    domain_name: str | None = None
    per_disk: dict[str, tuple[Path, str | None]] = {}
    if spec.hostguard is not None:
        for ref in spec.hostguard.refs:
            if ref.target is None:
                domain_wide, domain_name = Path(ref.envelope), ref.name
            else:
                per_disk[ref.target] = (Path(ref.envelope), ref.name)
    return domain_wide, per_disk, domain_name


def _check_device_policy(disk: DiskSpec, config: Config) -> bool:
    """True when the disk needs verification; False when policy lets it through unverified."""
    what = f"disk {disk.target}"
    if disk.device in ("cdrom", "floppy"):
        if disk.empty:
            return False  # an empty drive: no media, nothing to run
        if disk.device == "cdrom" and config.allow_cdrom:
            return False
        if disk.device == "cdrom" and config.profile != "none":
            return True  # a config drive or NoCloud seed: verified as one by its bytes (_plan_disk)
        raise DomainError(
            f"{what}: {disk.device} media are not allowed by policy (set [policy] allow_cdrom, "
            'or [policy] profile = "nova" for Nova\'s config drive, "kubevirt" for its NoCloud seed)'
        )
    if disk.device == "lun":
        raise DomainError(f"{what}: SCSI LUN passthrough is not allowed")
    kind = disk.source.kind
    if config.admits_unverified(kind, disk.source.path) is not None:
        return False
    if kind == "network":
        protocol = disk.source.protocol or "network"
        raise DomainError(
            f"{what}: {protocol} disks cannot be verified by hostguard (set [policy] allow_network_disks = true "
            "to let them through unverified)"
        )
    if kind == "block":
        path = disk.source.path or ""
        raise DomainError(
            f"{what}: block device {path} is not allowed by policy (name it in [policy] allow_block_devices, "
            "e.g. /dev/vg0/*, to let it through unverified)"
        )
    if kind != "file":
        raise DomainError(f"{what}: {kind} disks are not supported; use a file disk on a signed image")
    if disk.source.path is None:
        raise DomainError(f"{what}: disk has no source file")
    if disk.format is None:
        raise DomainError(f"{what}: no <driver type>: an explicit disk format is required")
    if disk.format not in ("raw", "qcow2"):
        raise DomainError(f"{what}: disk format {disk.format} is not supported (raw or qcow2)")
    if disk.data_store:
        raise DomainError(f"{what}: qcow2 external data files are not allowed")
    return True


def _walk_chain(disk: DiskSpec, stack: ExitStack) -> Iterator[tuple[Path, str, int]]:
    """Yield (path, format, fd) for each layer, top first, following qcow2 headers."""
    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
    from hostguard.host.qcow2 import looks_like_qcow2, read_qcow2_header, resolve_backing_path

    path = Path(disk.source.path or "")
    fmt = disk.format or ""
    what = f"disk {disk.target}"
    for depth in range(MAX_CHAIN + 1):
        if depth == MAX_CHAIN:
            raise DomainError(f"{what}: backing chain longer than {MAX_CHAIN} layers")
        if not path.is_absolute():
            raise DomainError(f"{what}: {path} is not an absolute path")
        try:
            fd = open_image(path)
        except ImageError as exc:
            raise DomainError(f"{what}: {exc.message}") from None
        stack.callback(os.close, fd)
        head = os.pread(fd, 4, 0)
        if fmt == "raw":
            if looks_like_qcow2(head):
                raise DomainError(f"{what}: raw image {path} looks like qcow2: refusing a format confusion")
            yield path, fmt, fd
            return
        if not looks_like_qcow2(head):
            raise DomainError(f"{what}: {path} is not a qcow2 image")
        try:
            header = read_qcow2_header(fd, name=str(path))
        except FormatError as exc:
            raise DomainError(f"{what}: {exc.message}") from None
        if header.external_data_file:
            raise DomainError(f"{what}: {path} uses an external data file")
        if header.encrypted:
            # The digest would cover the ciphertext, but no host-side reader can inspect what the guest runs.
            raise DomainError(f"{what}: {path} is encrypted ({header.encryption}): hostguard cannot inspect it")
        if header.corrupt:
            raise DomainError(f"{what}: QEMU marked {path} corrupt: check it with `qemu-img check -r all`")
        if header.dirty and depth > 0:
            # A dirty top overlay is normal after a host crash (QEMU repairs its refcounts when it opens it);
            # a backing file is never opened for writing, so a dirty one was modified after it was made.
            raise DomainError(f"{what}: backing file {path} is marked dirty: it was opened for writing")
        yield path, fmt, fd
        if header.backing_file is None:
            return
        if header.backing_format not in ("raw", "qcow2"):
            raise DomainError(
                f"{what}: {path} names backing file {header.backing_file} without an explicit "
                "backing format (rebase with -F raw|qcow2)"
            )
        try:
            path = resolve_backing_path(path, header.backing_file)
        except FormatError as exc:
            raise DomainError(f"{what}: {exc.message}") from None
        fmt = header.backing_format


def _check_xml_chain(disk: DiskSpec, layers: list[tuple[Path, str, int]]) -> None:
    """The chain libvirt builds is the XML's `<backingStore>` elements, then (unless the XML ends in the
    terminator `<backingStore/>`) what the last one's header names. It must be exactly the header chain that
    was verified: same paths as strings, same formats, same length."""
    what = f"disk {disk.target}"
    below = layers[1:]
    for i, backing in enumerate(disk.backing_chain):
        here = f"{what}: <backingStore> #{i + 1}"
        if i >= len(below):
            parent = layers[i][0]
            raise DomainError(
                f"{here} ({backing.source.path or backing.source.kind}) adds a layer under {parent}, whose header "
                "names no backing file: libvirt would hand QEMU an unverified layer"
            )
        path, fmt, _ = below[i]
        if backing.source.kind != "file" or backing.source.path != str(path) or backing.format != fmt:
            given = f"{backing.source.kind} {backing.source.path} ({backing.format or 'no format'})"
            raise DomainError(
                f"{here} names {given} but the image header chain has {path} ({fmt}): libvirt would open the XML's"
            )
    if disk.backing_end and len(disk.backing_chain) < len(below):
        cut = layers[len(disk.backing_chain)][0]
        raise DomainError(
            f"{what}: the XML ends the backing chain (<backingStore/>) at {cut}, whose header names backing file "
            f"{below[len(disk.backing_chain)][0]}: QEMU would open a different disk than was verified"
        )


def _by_content(digested: Digested, index_dirs: Sequence[Path]) -> Path | None:
    """The envelope named by the digest of the file the hook opened, in the configured index directories (a
    regular file, not a symlink: the envelope reader refuses those). It is verified like any other: a wrong entry
    denies, it never allows."""
    for directory in index_dirs:
        candidate = directory / f"{digested.sha256}{ENVELOPE_SUFFIX}"
        try:
            if stat.S_ISREG(os.lstat(candidate).st_mode):
                return candidate
        except OSError:
            continue
    return None


def _plan_disk(disk: DiskSpec, refs: Refs, state: StateStore, stack: ExitStack, config: Config) -> DiskPlan:
    domain_wide, per_disk, domain_name = refs
    plan = DiskPlan(disk.target)
    layers = list(_walk_chain(disk, stack))
    _check_xml_chain(disk, layers)
    plan.written = len(layers) > 1 and overlays_written(layers)
    for i, (path, fmt, fd) in enumerate(layers):
        last = i == len(layers) - 1
        ident = FileIdentity.from_stat(os.fstat(fd))
        plan.layers.append(Layer(path, fmt, ident, "signed" if last else "overlay"))
        if last:
            plan.digested = digest_fd(fd, path, state)
            if disk.target in per_disk:
                plan.envelope, plan.expected_name = per_disk[disk.target]
            elif domain_wide is not None:
                plan.envelope, plan.expected_name = domain_wide, domain_name
            else:
                beside = path.with_name(path.name + ENVELOPE_SUFFIX)
                index_dirs = config.envelope_index_dirs
                found = beside if beside.exists() else _by_content(plan.digested, index_dirs)
                if found is None:
                    what = "base image" if len(layers) > 1 else "image"
                    where = " nor by its digest in [policy] envelope_index_dirs" if index_dirs else ""
                    unsigned = f"disk {disk.target}: {what} {path} is not signed (no {beside.name}{where})"
                    if config.profile == "none":
                        raise DomainError(unsigned)
                    # lazy: host-made disks are checked only under a stack profile; other starts never load it
                    from hostguard.preboot.hostmade import classify

                    kind, problem = classify(disk, layers, config.profile)
                    if problem is not None:
                        raise DomainError(f"{unsigned} and is not a {kind}: {problem}")
                    plan.host_made = kind
                plan.envelope = found
    return plan


def _check_formats(plan: DiskPlan, outcome: Outcome) -> None:
    signed = plan.layers[-1]
    assert plan.digested is not None
    fmt = outcome.facts.disk_format(plan.digested.sha256, plan.digested.size)
    if fmt is not None and fmt != signed.format:
        raise DomainError(
            f"disk {plan.target}: {signed.path} is signed as {fmt} but would be opened as {signed.format}"
        )


def _open_state(directory: Path) -> StateStore | None:
    """The state store, or None when it cannot be opened (verifying re-opens it and reports why)."""
    try:
        return StateStore(directory)
    except ConfigError:
        return None


def decide(xml: bytes, config: Config, now: dt.datetime | float, operation: str = "prepare") -> Decision:
    """Verify a domain for start. Raises VerificationError/ConfigError/ImageError on any problem.

    `now` is a datetime or a POSIX timestamp. `operation` is the hook's: "restore" and "migrate" (incoming)
    resume saved RAM that no check has seen, so they are refused unless the policy allows them.
    """
    with ExitStack() as stack:
        state = _open_state(config.state_dir)
        if state is not None:
            stack.callback(state.close)
        spec = parse_domain_xml_cached(xml, state)
        exempt = config.exemption_for(spec.name)
        if exempt is not None:
            return Decision(spec, exempt_by=exempt)
        _check_operation(operation, config)
        check_host_inputs(spec, config)

        # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
        from hostguard.host.trustdir import read_trust_dir

        trust = read_trust_dir(config.trust_dir)  # a broken trust store denies even a domain with nothing to verify
        if state is None:
            state = stack.enter_context(StateStore(config.state_dir))  # raises the ConfigError saying why
        return _verify_disks(spec, config, state, trust=trust, now=now, stack=stack)


def _check_operation(operation: str, config: Config) -> None:
    if operation == "restore" and not config.allow_restore:
        raise DomainError(
            "restoring a saved domain runs RAM that no check has seen (set [policy] allow_restore = true to allow)"
        )
    if operation == "migrate" and not config.allow_incoming_migration:
        raise DomainError(
            "an incoming migration runs RAM that no check has seen "
            "(set [policy] allow_incoming_migration = true to allow)"
        )


def _check_one_image(outcomes: list[tuple[Path, Outcome]], boot_envelope: Path | None, config: Config) -> None:
    """Every disk and boot file of a domain comes from one signed image (name and version), unless the policy
    names the combination of image names; two versions of one image never mix."""
    images = {(o.facts.name, o.facts.version) for _, o in outcomes}
    if len(images) <= 1:
        return
    names = {name for name, _ in images}
    labels = ", ".join(f"{n} v{v}" for n, v in sorted(images))
    if len(names) < len(images):
        raise DomainError(f"the domain mixes versions of one image ({labels}): boot files and disks must match")
    if any(names <= combo for combo in config.allow_image_combinations):
        return
    boot = next((o.facts.label for env, o in outcomes if env == boot_envelope), None)
    source = f"; the kernel comes from {boot}" if boot else ""
    raise DomainError(
        f"the domain mixes signed images ({labels}){source}: one domain boots one signed image "
        "(name the combination in [policy] allow_image_combinations)"
    )


def _verify_disks(
    spec: DomainSpec,
    config: Config,
    state: StateStore,
    *,
    trust: TrustDirFiles,
    now: dt.datetime | float,
    stack: ExitStack,
) -> Decision:
    refs = _envelope_refs(spec)
    notes: list[str] = []
    plans: list[DiskPlan] = []
    host_made: list[DiskPlan] = []
    for disk in spec.disks:
        if _check_device_policy(disk, config):
            plan = _plan_disk(disk, refs, state, stack, config)
            if plan.host_made is None:
                plans.append(plan)
                continue
            # lazy: host-made disks are checked only under a stack profile; other starts never load it
            from hostguard.preboot.hostmade import check_not_bootable

            check_not_bootable(spec, disk, signed_before=bool(plans))
            host_made.append(plan)
            assert plan.digested is not None
            notes.append(
                f"disk {disk.target}: {plan.host_made} {plan.digested.path} (sha256 {plan.digested.sha256}) "
                f'allowed unsigned by [policy] profile = "{config.profile}"'
            )
        else:
            notes.append(f"disk {disk.target} ({disk.device}, {disk.source.kind}) allowed unverified by policy")

    primary = refs[0] or (plans[0].envelope if plans else None)
    if primary is None:
        raise DomainError("the domain has no signed disk and names no envelope in its hostguard metadata")
    groups: dict[Path, list[DiskPlan]] = {primary: []}
    for plan in plans:
        assert plan.envelope is not None
        groups.setdefault(plan.envelope, []).append(plan)

    outcomes: list[tuple[Path, Outcome]] = []
    for envelope, members in groups.items():
        boot = envelope == primary and spec.os.kernel is not None
        outcome = verify_files(
            read_envelope(envelope),
            config.trust_dir,
            now=now,
            state=state,
            trust=trust,
            digested=[p.digested for p in members if p.digested is not None] if members else None,
            kernel=Path(spec.os.kernel) if boot and spec.os.kernel else None,
            initrd=Path(spec.os.initrd) if boot and spec.os.initrd else None,
        )
        names = {p.expected_name for p in members if p.expected_name} | (
            {refs[2]} if envelope == refs[0] and refs[2] else set()
        )
        for name in names:
            if outcome.facts.name != name:
                raise DomainError(f"{envelope} signs image {outcome.facts.name!r}, not {name!r}")
        for plan in members:
            _check_formats(plan, outcome)
        if boot and spec.os.kernel and outcome.facts.kernel is None:
            raise DomainError(f"kernel {spec.os.kernel} is not signed: {outcome.facts.label} lists no boot files")
        outcomes.append((envelope, outcome))
    _check_one_image(outcomes, primary if spec.os.kernel is not None else None, config)
    if spec.os.kernel is not None:
        kernel_image = next(o for env, o in outcomes if env == primary)
        check_cmdline(spec, kernel_image.manifest_summary.get("boot"), kernel_image.facts.label, config)
    if any(p.written for p in plans):
        # lazy: only a start whose overlay holds data reads the guest's filesystems
        from hostguard.preboot.overlays import check_overlays

        notes += check_overlays(plans, outcomes, config, state, trust=trust, now=now)
    return Decision(
        spec,
        tuple(outcomes),
        tuple(plans),
        notes=tuple(notes),
        host_made=tuple(host_made),
        trust_store=trust.fingerprint,
    )


def rewarm_digests(config: Config, xml: bytes) -> int:
    """Re-hash, at `release end`, the signed files of the domain's pre-boot record; returns how many.

    libvirt changes the owner of a domain's disk images, kernel and initrd when it starts the domain and
    changes it back when it stops (dynamic_ownership): each chown gives the file a new ctime, which the digest
    cache rightly treats as a possible change. The content is hashed again here, after the owner is restored,
    and cached under the file's identity as it is now; if anything wrote the file meanwhile, its new digest
    simply fails the next start. Only the files recorded at `prepare` (same device and inode) and at most
    REWARM_MAX_BYTES each: a large image is left to `prepare` (or kept immutable, as the image library does).
    """
    with StateStore(config.state_dir) as state:
        spec = parse_domain_xml_cached(xml, state)
        record = load_domain_record(config.state_dir, spec.uuid)
        if record is None:
            return 0
        files = [d.signed_layer() for d in record.disks] + list(record.boot)
        done = 0
        for entry in files:
            path = Path(entry.path)
            try:
                fd = open_image(path)
            except ImageError:
                continue  # gone or replaced by a symlink: `prepare` will say so
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (entry.dev, entry.ino) and st.st_size <= REWARM_MAX_BYTES:
                    digest_fd(fd, path, state)
                    done += 1
            finally:
                os.close(fd)
        return done
