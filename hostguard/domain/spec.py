"""The typed view of a libvirt domain definition that `hostguard.domain.xmlparse` parses, and its JSON form.

Everything the pre-boot check decides on is here: disks and their backing chains, the boot files and
firmware, the hostguard metadata, and every other way the definition hands host content to the guest
(shared filesystems, passed-through devices, ACPI tables, option ROMs, fw_cfg blobs, file-backed memory
devices). The types are `hostguard.record.Record`s, not dataclasses: this module is imported on every VM start.
`spec_to_json` / `spec_from_json` serialize a DomainSpec exactly (the parse cache stores it).
"""

from __future__ import annotations

from hostguard.record import Record, from_plain, to_plain

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING


class SourceSpec(Record):
    """Where a disk (or a backing-chain member) lives. Only the fields of its `kind` are set.

    `path`: file= (file), dev= (block), dir= (dir), path= (vhostuser socket); None for an empty drive.
    `protocol`/`name`: network disks. `pool`/`volume`: storage-pool volumes. nvme has none of them.
    """

    kind: str
    path: str | None = None
    protocol: str | None = None
    name: str | None = None
    pool: str | None = None
    volume: str | None = None

    @property
    def is_local_path(self) -> bool:
        return self.kind in ("file", "block", "dir")


class BackingSpec(Record):
    """One `<backingStore>` of the XML. libvirt builds the chain QEMU opens from these (probing headers only
    below the last one), so the pre-boot check requires them to agree with the image headers layer by layer."""

    source: SourceSpec
    format: str | None


class DiskSpec(Record):
    device: str  # disk | cdrom | floppy | lun
    source: SourceSpec
    format: str | None  # <driver type=...>; None when absent
    target: str  # <target dev=...>
    readonly: bool
    backing_chain: tuple[BackingSpec, ...] = ()  # outermost first; () when the XML lists none
    backing_end: bool = False  # the XML chain ends in the terminator <backingStore/>: libvirt probes no further
    data_store: bool = False  # a <dataStore> (qcow2 external data file) appears anywhere in the disk

    @property
    def empty(self) -> bool:
        """A drive with no medium: a file/block/dir disk without a source path."""
        return self.source.is_local_path and self.source.path is None


class AcpiTableSpec(Record):
    """`<os><acpi><table type=...>PATH</table>`: a host file the guest's ACPI interpreter runs (AML)."""

    type: str
    path: str | None


class OsSpec(Record):
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    dtb: str | None = None
    loader: str | None = None
    loader_type: str | None = None  # rom | pflash
    loader_readonly: bool = False
    nvram: str | None = None
    nvram_template: str | None = None
    firmware: str | None = None  # <os firmware='efi|bios'> autoselection
    acpi_tables: tuple[AcpiTableSpec, ...] = ()
    boot_devs: tuple[str, ...] = ()  # <os><boot dev=...> in order: hd | cdrom | fd | network


class EnvelopeRef(Record):
    """An envelope named by the hostguard metadata. `target` None means domain-wide."""

    envelope: str
    name: str | None = None
    target: str | None = None


class HostguardMetadata(Record):
    refs: tuple[EnvelopeRef, ...]  # the domain-wide ref first (if any), then per-disk refs in XML order

    @property
    def domain_ref(self) -> EnvelopeRef | None:
        return next((r for r in self.refs if r.target is None), None)

    def ref_for(self, target: str) -> EnvelopeRef | None:
        """The envelope that covers disk `target`: its own, else the domain-wide one, else None."""
        own = next((r for r in self.refs if r.target == target), None)
        return own if own is not None else self.domain_ref


class FilesystemSpec(Record):
    """`<filesystem>`: a host directory/file shared into the guest (virtiofs, 9p, ...)."""

    type: str  # mount | file | block | template | ram | bind | volume
    driver: str | None  # path | handle | virtiofs | loop | nbd | ploop | mtp
    source: str | None  # dir / file / dev / name / socket, whichever the type has
    target: str | None  # the mount tag (target dir)
    readonly: bool


class HostdevSpec(Record):
    """A passed-through host device: `<hostdev>` (PCI, USB, SCSI, mdev, ...) or `<redirdev>` (USB redirection)."""

    element: str  # hostdev | redirdev
    mode: str | None  # subsystem | capabilities (hostdev); None for redirdev
    type: str | None  # pci | usb | scsi | mdev | ... ; spicevmc | tcp | ... for redirdev


class HostFileSpec(Record):
    """Another host file the guest runs or reads: an option ROM, a fw_cfg blob, a file-backed memory device."""

    kind: str  # rom | fwcfg | memory
    owner: str  # which element names it ("interface #0", "opt/com.example/blob", "nvdimm #0")
    path: str | None  # None for a fw_cfg entry given inline


class BootEntrySpec(Record):
    """A per-device `<boot order='N'/>`: `kind` is disk | cdrom | floppy | lun | network | hostdev | redirdev."""

    owner: str  # "disk vda", "interface #0"
    kind: str
    order: int


class DomainSpec(Record):
    name: str
    uuid: str  # canonical lower-case 8-4-4-4-12
    type: str  # kvm | qemu
    disks: tuple[DiskSpec, ...]
    os: OsSpec
    vmcoreinfo: bool = False
    hostguard: HostguardMetadata | None = None
    qemu_passthrough: tuple[str, ...] = ()
    filesystems: tuple[FilesystemSpec, ...] = ()
    hostdevs: tuple[HostdevSpec, ...] = ()
    host_files: tuple[HostFileSpec, ...] = ()
    emulator: str | None = None  # <devices><emulator>: the binary libvirt executes; None = libvirt's default
    boot_order: tuple[BootEntrySpec, ...] = ()
    shmem: tuple[str, ...] = ()  # names of <shmem> devices
    oem_strings: tuple[str, ...] = ()  # SMBIOS type 11 strings, verbatim
    # Local names of <qemu:*> children of <domain> (commandline, override, ...): raw QEMU arguments that
    # can add drives or a kernel behind every check above. Policy should refuse a non-empty tuple.

    def disk(self, target: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.target == target), None)


_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (
        SourceSpec,
        BackingSpec,
        DiskSpec,
        AcpiTableSpec,
        OsSpec,
        EnvelopeRef,
        HostguardMetadata,
        FilesystemSpec,
        HostdevSpec,
        HostFileSpec,
        BootEntrySpec,
        DomainSpec,
    )
}


def spec_to_json(spec: DomainSpec) -> str:
    import json

    return json.dumps(to_plain(spec), separators=(",", ":"), sort_keys=True)


def spec_from_json(text: str) -> DomainSpec:
    """Inverse of `spec_to_json`. ValueError when `text` is not one."""
    import json

    spec = from_plain(json.loads(text), _TYPES)
    if not isinstance(spec, DomainSpec):
        raise ValueError("not a DomainSpec")
    return spec
