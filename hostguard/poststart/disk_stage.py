"""Post-start stage "disk-content": what the guest will execute, read from the host, against the signed manifest.

For each signed image set in the domain's pre-boot record (one envelope, its disks in manifest order):

1. Before touching the domain: re-verify the envelope (cheap: the verdict cache) and parse its manifest for
   the `files` list; open each disk's signed base layer (O_NOFOLLOW, same device/inode as recorded) and check
   its digest (cached by identity: a base rewritten in place misses the cache and is hashed again) against
   the manifest; load the base images' index (`imagefs.diskindex`) from the state directory, keyed by their
   digests, or build it once (a full inventory of the base).
2. Hold the domain still: suspend it unless it is already paused (quarantine and `hostguard start` keep it
   paused), resume it afterwards only if we suspended it. QEMU flushes its block layer when it stops, so the
   image files then hold everything the guest wrote. A suspended domain was chosen over a disk-only snapshot:
   a snapshot would change the domain's disk chain (the files QEMU has open, what the pre-boot record and the
   other stages check) and leave a chain to merge back after every check.
3. Open the recorded chain ourselves (`imagefs.chain`: every layer must be the recorded file and name the next
   recorded layer as its backing file), read it with the fast reader, the ext journal replayed in memory, and
   inventory it incrementally (`imagefs.incremental`): only what the overlays changed is read beyond the
   index.
4. Compare with the manifest's `files` (`compare.compare_files`): missing, changed and unexpected executables.
5. In the same hold, read the disks a stack profile let start unsigned (`poststart.hostmade_disks`): every
   executable on them is a finding; what the fast reader does not read (swap, a config drive) is a note.

What cannot be checked is a CHECK_UNAVAILABLE finding naming the reason (policy decides what it costs):
never a silent pass. A layer that is not the verified file, a chain that disagrees with the record, or a
base image whose content changed since pre-boot is an UNVERIFIED_OPEN finding.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostguard.domain.record import DomainRecord
from hostguard.errors import ConfigError, CrlStateError, HostguardError, ImageError
from hostguard.host import libvirt
from hostguard.host.digest import FileIdentity, digest_fd, open_image
from hostguard.host.fsutil import atomic_write
from hostguard.host.locks import domain_lock
from hostguard.host.state import StateStore
from hostguard.host.verify_files import read_envelope, verify_files
from hostguard.imagefs import MALFORMED_INPUT_ERRORS
from hostguard.imagefs.chain import ChainMismatch, LayerRecord
from hostguard.imagefs.overlayview import LazyBases, effective_files, load_or_build_index
from hostguard.poststart.hostmade_disks import host_made_disks, inspect_host_made
from hostguard.record import Record, field
from hostguard.signed.envelope import parse_envelope
from hostguard.signed.findings import CHECK_UNAVAILABLE, UNVERIFIED_OPEN, Finding, compare_files
from hostguard.signed.manifest import FileEntry, parse_manifest

if TYPE_CHECKING:
    from hostguard.host.config import Config
    from hostguard.host.digest import Digested
    from hostguard.host.state import StateStore
    from hostguard.imagefs.chain import LayerRecord
    from hostguard.imagefs.diskindex import DiskIndex
    from hostguard.poststart.context import CheckContext

log = logging.getLogger("hostguard.poststart.disk_stage")
STAGE = "disk-content"
HELD_DIR = "held"  # markers of domains suspended only to read their disks (a restarted daemon resumes them)


class RecordDisk(Record, frozen=False):
    target: str
    layers: list[LayerRecord]  # top first; the last is the signed base


class ImageSet(Record, frozen=False):
    """The disks of one envelope, in manifest order once prepared."""

    envelope: Path
    disks: list[RecordDisk]
    label: str = ""
    files: tuple[FileEntry, ...] = ()
    bases: list[Digested] = field(default_factory=list)
    index: DiskIndex | None = None
    base_reader: LazyBases | None = None  # opened only if the index is built or an overlay holds data
    stats: dict[str, Any] = field(default_factory=dict)


class _Unavailable(Exception):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.finding = Finding(CHECK_UNAVAILABLE, path, "the disk content check", why)


class _Unverified(Exception):
    def __init__(self, path: str, expected: str, found: str) -> None:
        super().__init__(found)
        self.finding = Finding(UNVERIFIED_OPEN, path, expected, found)


# --- the stage -------------------------------------------------------------------------------------------


def stage_disk_content(ctx: CheckContext) -> list[Finding]:
    """The post-start stage (see the module docstring). Timings and counters go to ctx.extra["disk-content"]."""

    if ctx.record is None:
        return []  # the record stage reported it
    sets = image_sets(ctx.record)
    made = host_made_disks(ctx.record)
    if not sets and not made:
        return []
    findings: list[Finding] = []
    extra: dict[str, Any] = {"sets": []}
    ctx.extra[STAGE] = extra
    with StateStore(ctx.config.state_dir) as state, ExitStack() as stack:
        try:
            stack.enter_context(domain_lock(ctx.config.state_dir, ctx.uuid))
        except TimeoutError:
            return [Finding(CHECK_UNAVAILABLE, ctx.name, "the disk content check", "another check holds the domain")]
        ready: list[ImageSet] = []
        t = time.monotonic()
        for s in sets:
            try:
                prepare(s, ctx.config, state, stack)
                ready.append(s)
            except (_Unavailable, _Unverified) as exc:
                findings.append(exc.finding)
        extra["prepare_ms"] = (time.monotonic() - t) * 1000
        if not ready and not made:
            return findings
        try:
            with held_still(ctx.dom, ctx.config.state_dir) as hold:
                for s in ready:
                    try:
                        findings.extend(inspect(s))
                    except (_Unavailable, _Unverified) as exc:
                        findings.append(exc.finding)
                t = time.monotonic()
                for disk in made:
                    found, notes = inspect_host_made(disk)
                    findings.extend(found)
                    ctx.notes.extend(notes)
                hold["host_made_ms"] = (time.monotonic() - t) * 1000
        except _Unavailable as exc:
            return [*findings, exc.finding]
        extra.update(hold)
        for s in ready:
            findings.extend(_bases_unchanged(s))
            extra["sets"].append({"image": s.label, **s.stats})
        extra["host_made"] = [{"target": d.target, "kind": d.kind, **d.stats} for d in made]
    log.info("%s: disk content: %s", ctx.name, json.dumps(extra, default=str))
    return findings


@contextmanager
def held_still(dom: libvirt.Domain, state_dir: Path) -> Iterator[dict[str, Any]]:
    """Suspend the domain unless it is paused already; resume it afterwards only if we suspended it.

    A marker (HELD_DIR/UUID) is on disk before the suspend and removed after the resume: a daemon killed in
    between leaves it, and the restarted daemon resumes the domain (`resume_held`) instead of taking the pause
    for someone else's."""
    info: dict[str, Any] = {"suspended": False}
    try:
        if dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
            mark_held(state_dir, dom)
            try:
                dom.suspend()
            except libvirt.libvirtError:
                # Perhaps suspended, the answer lost with the connection: then the marker makes the reconnect resume it.
                if libvirt.suspend_did_not_happen(dom):
                    clear_held(state_dir, dom.UUIDString())
                raise
            info["suspended"] = True
    except libvirt.libvirtError as exc:
        raise _Unavailable(dom.name(), f"cannot suspend the domain for a consistent view: {exc}") from None
    started = time.monotonic()
    try:
        yield info
    finally:
        info["held_ms"] = (time.monotonic() - started) * 1000
        # Resumed only while still ours: a check given up at its deadline had its hold released (and its marker
        # removed) by the daemon; resuming now could release a pause someone else made since.
        if info["suspended"] and held_marker(state_dir, dom.UUIDString()).exists():
            try:
                dom.resume()
                clear_held(state_dir, dom.UUIDString())
            except libvirt.libvirtError as exc:  # it stays paused (the safe side); the marker makes recovery retry
                log.error("cannot resume %s after the disk check: %s", dom.name(), exc)


def held_marker(state_dir: Path, uuid: str) -> Path:
    """The marker of a domain held suspended for its disk stage: present from before the suspend until the
    resume; whoever removes it (the check, or the daemon releasing a given-up check's hold) owns the resume."""
    return state_dir / HELD_DIR / uuid


def mark_held(state_dir: Path, dom: libvirt.Domain) -> None:
    """Record, durably, that this domain is about to be suspended only to be looked at."""

    doc = {"domain": dom.name(), "id": dom.ID(), "since": time.time(), "pid": os.getpid()}
    try:
        (state_dir / HELD_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(held_marker(state_dir, dom.UUIDString()), json.dumps(doc).encode(), mode=0o600)
    except (OSError, HostguardError) as err:
        why = err.message if isinstance(err, HostguardError) else err.strerror
        raise ConfigError(
            f"state directory {state_dir}: cannot record that {dom.name()} is held for its disk check, so it is "
            f"not suspended: {why}"
        ) from None


def clear_held(state_dir: Path, uuid: str) -> None:
    held_marker(state_dir, uuid).unlink(missing_ok=True)


def resume_held(conn: libvirt.Connection, state_dir: Path) -> list[str]:
    """After a restart: resume every domain a killed check left suspended for its disk stage (same instance, still
    paused by a user-type pause), and drop the markers. Returns the names resumed."""
    directory = state_dir / HELD_DIR
    resumed: list[str] = []
    if not directory.is_dir():
        return resumed
    for marker in sorted(directory.iterdir()):
        if marker.name.startswith("."):
            continue
        with domain_lock(state_dir, marker.name):  # a live check may hold it (hook notification meanwhile)
            name = resume_held_domain(conn, state_dir, marker.name)
        if name is not None:
            resumed.append(name)
    return resumed


def resume_held_domain(conn: libvirt.Connection, state_dir: Path, uuid: str) -> str | None:
    """Resume one domain held for its disk stage (`resume_held`), without its check lock: for a check that is
    given up while it still holds that lock (blocked on hung storage). Returns its name if it was resumed."""
    marker = held_marker(state_dir, uuid)
    try:
        doc = json.loads(marker.read_bytes())
    except FileNotFoundError:
        return None  # that check finished and cleared it
    except (OSError, ValueError) as err:
        log.error("unreadable held marker %s: %s", marker, err)
        return None
    resumed = None
    try:
        dom = conn.lookupByUUIDString(uuid)
        state, reason = dom.state()
        same = dom.isActive() and dom.ID() == doc.get("id")
        if same and state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER:
            dom.resume()
            resumed = dom.name()
            log.warning("%s: resumed; a check interrupted by the daemon's end held it suspended", dom.name())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            log.error("cannot resume %s held by an interrupted check: %s", doc.get("domain"), exc)
            return None  # keep the marker: try again at the next start
    marker.unlink(missing_ok=True)
    return resumed


# --- record -> image sets --------------------------------------------------------------------------------


def image_sets(record: DomainRecord) -> list[ImageSet]:
    """Group the record's disks by envelope (order of first appearance)."""

    sets: dict[str, ImageSet] = {}
    for disk in record.disks:
        layers = [LayerRecord(Path(x.path), x.format, x.dev, x.ino) for x in disk.layers]
        sets.setdefault(disk.envelope, ImageSet(Path(disk.envelope), [])).disks.append(RecordDisk(disk.target, layers))
    return list(sets.values())


# --- before the domain is held ---------------------------------------------------------------------------


def prepare(s: ImageSet, config: Config, state: StateStore, stack: ExitStack) -> None:
    """Manifest files, base digests in manifest order, the base index and a reader on the bases."""

    what = s.disks[0].target
    try:
        envelope = read_envelope(s.envelope)
        outcome = verify_files(envelope, config.trust_dir, now=time.time(), state=state)
        manifest = parse_manifest(parse_envelope(envelope).payload)
    except (ConfigError, CrlStateError):
        raise  # the host's trust store, CRLs or state: a host error, no finding about this guest (ADR 0011, 0024)
    except HostguardError as err:
        raise _Unavailable(what, f"the manifest {s.envelope} no longer verifies: {err}") from None
    s.label = outcome.facts.label
    if not manifest.files:
        raise _Unavailable(what, f"{s.label}: the manifest lists no files to compare the disk with")
    s.files = manifest.files
    by_disk: dict[tuple[str, int], int] = {(d.sha256, d.size): i for i, d in enumerate(manifest.disks)}
    # A base that is the raw conversion of the signed image (Nova's _base) verified by its content digest.
    by_disk.update({(d.content.sha256, d.content.size): i for i, d in enumerate(manifest.disks) if d.content})
    ordered: list[tuple[int, RecordDisk, Digested | None]] = []
    for disk in s.disks:
        base = disk.layers[-1]
        try:
            fd = open_image(base.path)
        except ImageError as err:
            raise _Unverified(str(base.path), "the verified base image", err.message) from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (base.dev, base.ino):
                raise _Unverified(str(base.path), f"device/inode {base.dev}/{base.ino}", f"{st.st_dev}/{st.st_ino}")
            try:
                digested: Digested | None = digest_fd(fd, base.path, state)
            except ImageError:
                digested = None  # written to while hashed
        finally:
            os.close(fd)
        slot = by_disk.get((digested.sha256, digested.size)) if digested is not None else None
        if slot is None and len(disk.layers) == 1 and len(s.disks) == len(manifest.disks) == 1:
            # The domain uses the signed image itself as its (writable) disk: the guest's writes change it.
            # That is the file QEMU opened; its content is what the guest runs: inventory it all.
            ordered.append((0, disk, None))
            continue
        if slot is None or digested is None:
            found = f"sha256 {digested.sha256[:16]} ({digested.size} bytes)" if digested else "changing content"
            raise _Unverified(str(base.path), f"a disk of {s.label}", found)
        ordered.append((slot, disk, digested))
    ordered.sort(key=lambda x: x[0])
    if [slot for slot, _, _ in ordered] != list(range(len(manifest.disks))):
        raise _Unavailable(what, f"{s.label} has {len(manifest.disks)} disk(s); the domain attaches them otherwise")
    s.disks = [d for _, d, _ in ordered]
    bases = [g for _, _, g in ordered]
    if any(g is None for g in bases):
        s.stats["index"] = "none: the signed image itself is written by the guest"
        return
    s.bases = [g for g in bases if g is not None]
    t = time.monotonic()
    try:
        s.base_reader = stack.enter_context(LazyBases([d.layers for d in s.disks]))
        s.index, built = load_or_build_index(config.state_dir, s.base_reader, [g.sha256 for g in s.bases])
    except ImageError as err:  # UnsupportedLayout included
        raise _Unavailable(what, f"{s.label}: the base image cannot be read: {err.message}") from None
    s.stats["index"] = "built" if built else "cached"
    s.stats["index_ms"] = (time.monotonic() - t) * 1000


# --- while the domain is held ----------------------------------------------------------------------------


def inspect(s: ImageSet) -> list[Finding]:
    """Read the effective view of the set's disks and compare it with the manifest."""

    what = s.disks[0].target
    try:
        files, stats = effective_files([d.layers for d in s.disks], s.index, s.base_reader)
    except ChainMismatch as err:
        raise _Unverified(what, "the chain of files the pre-boot check verified", err.message) from None
    except ImageError as err:  # UnsupportedLayout included: e.g. a journal we do not replay
        raise _Unavailable(what, f"{s.label}: the disk cannot be read: {err.message}") from None
    except MALFORMED_INPUT_ERRORS as err:
        raise _Unavailable(what, f"{s.label}: malformed disk data ({type(err).__name__}: {err})") from None
    s.stats.update(stats.to_json())
    return compare_files(s.files, files)


def _bases_unchanged(s: ImageSet) -> list[Finding]:
    """The base files must still be what was digested before the view was read (no rewrite in between)."""

    out: list[Finding] = []
    if not s.bases:
        return out  # the signed image is the guest's writable disk: it changes, by design
    for disk, digested in zip(s.disks, s.bases, strict=True):
        try:
            now = FileIdentity.from_stat(os.stat(disk.layers[-1].path, follow_symlinks=False))
        except OSError as err:
            now = None
            found = f"cannot stat: {err.strerror}"
        if now != digested.identity:
            found = "modified while it was being read" if now is not None else found
            out.append(Finding(UNVERIFIED_OPEN, str(disk.layers[-1].path), "the verified base image", found))
    return out
