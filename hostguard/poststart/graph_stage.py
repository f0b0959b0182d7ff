"""The block-graph stage: every node of QEMU's block graph, and every file QEMU holds open, must be one pre-boot
verified (by path and by device/inode) or one the policy names. docs/adr/0019-block-graph.md says why QEMU is
asked (not libvirt's XML, not the recorded chain).

QEMU is asked for its nodes (`query-named-block-nodes`, through the one libvirt adapter); /proc/PID/fd says which
file each file node has open. What is accepted:
- a file node whose path is a recorded layer, boot file or host-made file and whose open file is that very file
  (device and inode), and a format node opening a recorded layer in the recorded format;
- a file node of a CD-ROM medium in the live definition under `[policy] allow_cdrom`, of a block device matched
  by `[policy] allow_block_devices`, the domain's firmware loader and nvram (checked before boot as host inputs);
- network nodes under `[policy] allow_network_disks`; filter nodes (throttle, copy-on-read, block-job filters),
  which hold no data of their own (their children are nodes too and judged as such).
A backing layer on record (below a disk's top) that QEMU has open for writing is a finding too: a block commit
is rewriting the signed (or a shared host-made) base. Anything else is a finding: `unverified-media` for a
medium of a CD-ROM/floppy drive, `unverified-block-node` for any other node (a middle layer added to the chain,
a block job's target, a `blockdev-add`, a swapped file, a driver hostguard does not verify), `unverified-file-open`
for a file QEMU holds open for reading that no node explains (write-only descriptors, e.g. a memory dump being
written, feed the guest nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from hostguard.domain.paths import glob_match
from hostguard.domain.record import DomainRecord
from hostguard.domain.spec import DomainSpec
from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import ConfigError
from hostguard.host.config import Config
from hostguard.host.libvirt import QEMU_RUN_DIR, BlockNode, OpenFile, open_files, qemu_block_nodes, qemu_pid
from hostguard.poststart.context import CheckContext
from hostguard.signed.findings import (
    CHECK_UNAVAILABLE,
    UNVERIFIED_BLOCK_NODE,
    UNVERIFIED_MEDIA,
    UNVERIFIED_OPEN,
    Finding,
)

FILE_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})
FORMAT_DRIVERS = frozenset({"raw", "qcow2"})  # the formats pre-boot verifies
# Filters: no data of their own, every child is a node of the graph and judged as one.
FILTER_DRIVERS = frozenset(
    {"throttle", "copy-on-read", "mirror_top", "commit_top", "copy-before-write", "preallocate", "compress"}
)
NETWORK_DRIVERS = frozenset({"nbd", "iscsi", "rbd", "gluster", "http", "https", "ftp", "ftps", "ssh", "nfs"})
# Memory QEMU maps from a file is no disk: memfd and hugetlbfs backing and libvirt's file-backed memory directory
# (all checked before boot as host inputs by hostguard.preboot.hostinputs).
MEMORY_PREFIXES = ("/memfd:", "/dev/hugepages/", "/var/lib/libvirt/qemu/ram/")
REPORTED = "reported-paths"  # ctx.extra key: paths an earlier stage of this check already has a finding for


def stage_block_graph(ctx: CheckContext) -> list[Finding]:
    if ctx.record is None:
        return []  # the record stage already has a finding: started without the hook
    if ctx.record.host_made is None and ctx.config.profile != "none":
        return [
            Finding(
                CHECK_UNAVAILABLE,
                "block-graph",
                "a pre-boot record that names the host-made disks",
                "a record of an earlier release: restart the domain to check its block graph",
            )
        ]
    pid = qemu_pid(ctx.name)
    try:
        if pid is None:
            raise ConfigError("no QEMU pid file")
        nodes = qemu_block_nodes(ctx.dom)
        held = open_files(pid)
    except ConfigError as exc:
        return [Finding(CHECK_UNAVAILABLE, "block-graph", "QEMU's block graph", str(exc))]
    spec = parse_domain_xml(ctx.live_xml)
    reported: set[str] = ctx.extra.get(REPORTED, set())
    findings = judge_graph(nodes, held, ctx.record, spec, ctx.config, pid_file=str(QEMU_RUN_DIR / f"{ctx.name}.pid"))
    return [f for f in findings if f.path not in reported]


class _Known:
    """What pre-boot verified (or let through as host-made), by path: the identities and the format."""

    def __init__(self, record: DomainRecord) -> None:
        self.ids: dict[str, set[tuple[int, int]]] = {}
        self.formats: dict[str, str] = {}
        # Layers below a disk's top: QEMU only reads them. One open for writing is the base of a block commit
        # (the signed base, or a host-made base other domains share, being rewritten).
        self.backing: set[str] = set()
        for disk in record.disks:
            for layer in disk.layers:
                self._add(layer.path, layer.dev, layer.ino)
                self.formats[layer.path] = layer.format
            self.backing.update(x.path for x in disk.layers[1:])
        for f in record.boot:
            self._add(f.path, f.dev, f.ino)
        tops: set[str] = set()
        for h in record.host_made or ():
            self._add(h.path, h.dev, h.ino)
            if h.target in tops:  # the hook records each host-made disk's layers top first
                self.backing.add(h.path)
            tops.add(h.target)

    def _add(self, path: str, dev: int, ino: int) -> None:
        self.ids.setdefault(path, set()).add((dev, ino))

    def identities(self) -> set[tuple[int, int]]:
        return set().union(*self.ids.values()) if self.ids else set()


def _held_under(path: str, held: Sequence[OpenFile]) -> list[OpenFile]:
    """The open files the kernel names `path` (or its real path: a directory on the way may be a link)."""
    names = {path, os.path.realpath(path)}
    return [f for f in held if f.path in names]


def _policy_allows(node: BlockNode, spec: DomainSpec, config: Config) -> str | None:
    """Why the policy lets this host file through unverified, or None."""
    path = node.filename
    for disk in spec.disks:
        if disk.device == "cdrom" and disk.source.path == path and config.allow_cdrom:
            return "allow_cdrom"
    # as pre-boot: the globs name block devices (QEMU's host_device/host_cdrom drivers), never regular files
    if node.driver != "file" and any(glob_match(path, g) for g in config.allow_block_devices):
        return "allow_block_devices"
    if path in (spec.os.loader, spec.os.nvram):
        return "firmware checked before boot"
    return None


def _removable(path: str, spec: DomainSpec) -> bool:
    return any(d.device in ("cdrom", "floppy") and d.source.path == path for d in spec.disks)


def _file_node(
    node: BlockNode, held: Sequence[OpenFile], known: _Known, spec: DomainSpec, config: Config
) -> Finding | None:
    path = node.filename
    opened = _held_under(path, held)
    ids = {(f.dev, f.ino) for f in opened}
    if path in known.ids:
        if not ids:
            return Finding(
                UNVERIFIED_BLOCK_NODE,
                path,
                f"QEMU's node {node.name} holds the verified file",
                "QEMU holds no file under this name (renamed or removed since it was opened)",
            )
        if not ids <= known.ids[path]:
            shown = ", ".join(f"{d}:{i}" for d, i in sorted(ids - known.ids[path]))
            return Finding(
                UNVERIFIED_BLOCK_NODE,
                path,
                f"the verified file ({', '.join(f'{d}:{i}' for d, i in sorted(known.ids[path]))})",
                f"node {node.name} has another file open at this path ({shown})",
            )
        return None
    if _policy_allows(node, spec, config) is not None:
        return None
    if _removable(path, spec):
        return Finding(
            UNVERIFIED_MEDIA,
            path,
            "no medium, or one verified before boot ([policy] allow_cdrom lets any through)",
            f"a medium inserted after start (node {node.name})",
        )
    return Finding(
        UNVERIFIED_BLOCK_NODE, path, "a file verified before boot", f"QEMU's node {node.name} opens it unverified"
    )


def _node_finding(
    node: BlockNode, held: Sequence[OpenFile], known: _Known, spec: DomainSpec, config: Config
) -> Finding | None:
    if node.driver in FILE_DRIVERS:
        return _file_node(node, held, known, spec, config)
    if node.driver in FORMAT_DRIVERS:
        fmt = known.formats.get(node.filename)
        if fmt is not None and fmt != node.driver:
            return Finding(
                UNVERIFIED_BLOCK_NODE, node.filename, f"opened as {fmt}", f"node {node.name} reads it as {node.driver}"
            )
        return None  # its data come from its file child, a node judged on its own
    if node.driver in FILTER_DRIVERS:
        return None
    if node.driver in NETWORK_DRIVERS and config.allow_network_disks:
        return None
    return Finding(
        UNVERIFIED_BLOCK_NODE,
        node.filename or node.name,
        "a file node, a raw or qcow2 format node, or a filter",
        f"node {node.name} uses driver {node.driver!r}, which hostguard does not verify",
    )


def _written_backing(nodes: Sequence[BlockNode], known: _Known) -> list[Finding]:
    """Backing layers on record that QEMU has open for writing: the base of a block commit being rewritten. The
    read-only flag that counts is the format node's: libvirt opens the file node under a format layer with
    `auto-read-only`, which QEMU reports as writable whether or not anything writes; a raw file without a format
    layer is judged by its file node."""
    by_file: dict[str, list[BlockNode]] = {}
    for node in nodes:
        if node.filename in known.backing and node.driver in FORMAT_DRIVERS | FILE_DRIVERS:
            by_file.setdefault(node.filename, []).append(node)
    findings = []
    for path, on_file in by_file.items():
        top = [n for n in on_file if n.driver in FORMAT_DRIVERS] or on_file
        if any(not n.read_only for n in top):
            findings.append(
                Finding(
                    UNVERIFIED_BLOCK_NODE,
                    path,
                    "a backing layer QEMU only reads",
                    "QEMU has it open for writing (the base of a block commit)",
                )
            )
    return findings


def judge_graph(
    nodes: Iterable[BlockNode],
    held: Sequence[OpenFile],
    record: DomainRecord,
    spec: DomainSpec,
    config: Config,
    *,
    pid_file: str,
) -> list[Finding]:
    """The findings for QEMU's nodes and open files against the record and the policy (pure but for realpath)."""
    known, nodes = _Known(record), tuple(nodes)  # read twice below
    findings: list[Finding] = []
    node_files: set[str] = set()
    for node in nodes:
        if node.driver in FILE_DRIVERS:
            node_files.update({node.filename, os.path.realpath(node.filename)})
        finding = _node_finding(node, held, known, spec, config)
        if finding is not None and finding not in findings:
            findings.append(finding)
    findings += [f for f in _written_backing(nodes, known) if f not in findings]
    verified = known.identities()
    for f in held:
        explained = f.path in node_files or (f.dev, f.ino) in verified or f.path == pid_file
        # a write-only descriptor (a memory dump, a screenshot being written) gives the guest nothing to read
        if explained or not f.readable or f.path.startswith(MEMORY_PREFIXES):
            continue
        findings.append(
            Finding(UNVERIFIED_OPEN, f.path, "only the files of QEMU's block graph", f"QEMU holds it open (fd {f.fd})")
        )
    return findings
