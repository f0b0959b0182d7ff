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

    __slots__ = ("kind", "name", "path", "pool", "protocol", "volume")
    kind: str
    path: str | None
    protocol: str | None
    name: str | None
    pool: str | None
    volume: str | None

    def __init__(
        self,
        kind: str,
        path: str | None = None,
        *,
        protocol: str | None = None,
        name: str | None = None,
        pool: str | None = None,
        volume: str | None = None,
    ) -> None:
        self._init(kind=kind, path=path, protocol=protocol, name=name, pool=pool, volume=volume)

    @property
    def is_local_path(self) -> bool:
        return self.kind in ("file", "block", "dir")


class BackingSpec(Record):
    """One `<backingStore>` of the XML. libvirt builds the chain QEMU opens from these (probing headers only
    below the last one), so the pre-boot check requires them to agree with the image headers layer by layer."""

    __slots__ = ("format", "source")
    source: SourceSpec
    format: str | None

    def __init__(self, source: SourceSpec, format: str | None) -> None:
        self._init(source=source, format=format)


class DiskSpec(Record):
    __slots__ = ("backing_chain", "backing_end", "data_store", "device", "format", "readonly", "source", "target")
    device: str  # disk | cdrom | floppy | lun
    source: SourceSpec
    format: str | None  # <driver type=...>; None when absent
    target: str  # <target dev=...>
    readonly: bool
    backing_chain: tuple[BackingSpec, ...]  # outermost first; () when the XML lists none
    backing_end: bool  # the XML chain ends in the terminator <backingStore/>: libvirt probes no further
    data_store: bool  # a <dataStore> (qcow2 external data file) appears anywhere in the disk

    def __init__(
        self,
        device: str,
        source: SourceSpec,
        format: str | None,
        target: str,
        readonly: bool,
        *,
        backing_chain: tuple[BackingSpec, ...] = (),
        backing_end: bool = False,
        data_store: bool = False,
    ) -> None:
        self._init(
            device=device,
            source=source,
            format=format,
            target=target,
            readonly=readonly,
            backing_chain=backing_chain,
            backing_end=backing_end,
            data_store=data_store,
        )

    @property
    def empty(self) -> bool:
        """A drive with no medium: a file/block/dir disk without a source path."""
        return self.source.is_local_path and self.source.path is None


class AcpiTableSpec(Record):
    """`<os><acpi><table type=...>PATH</table>`: a host file the guest's ACPI interpreter runs (AML)."""

    __slots__ = ("path", "type")
    type: str
    path: str | None

    def __init__(self, type: str, path: str | None) -> None:
        self._init(type=type, path=path)


class OsSpec(Record):
    __slots__ = (
        "acpi_tables",
        "boot_devs",
        "cmdline",
        "dtb",
        "firmware",
        "initrd",
        "kernel",
        "loader",
        "loader_readonly",
        "loader_type",
        "nvram",
        "nvram_template",
    )
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    dtb: str | None
    loader: str | None
    loader_type: str | None  # rom | pflash
    loader_readonly: bool
    nvram: str | None
    nvram_template: str | None
    firmware: str | None  # <os firmware='efi|bios'> autoselection
    acpi_tables: tuple[AcpiTableSpec, ...]
    boot_devs: tuple[str, ...]  # <os><boot dev=...> in order: hd | cdrom | fd | network

    def __init__(
        self,
        *,
        kernel: str | None = None,
        initrd: str | None = None,
        cmdline: str | None = None,
        dtb: str | None = None,
        loader: str | None = None,
        loader_type: str | None = None,
        loader_readonly: bool = False,
        nvram: str | None = None,
        nvram_template: str | None = None,
        firmware: str | None = None,
        acpi_tables: tuple[AcpiTableSpec, ...] = (),
        boot_devs: tuple[str, ...] = (),
    ) -> None:
        self._init(
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            dtb=dtb,
            loader=loader,
            loader_type=loader_type,
            loader_readonly=loader_readonly,
            nvram=nvram,
            nvram_template=nvram_template,
            firmware=firmware,
            acpi_tables=acpi_tables,
            boot_devs=boot_devs,
        )


class EnvelopeRef(Record):
    """An envelope named by the hostguard metadata. `target` None means domain-wide."""

    __slots__ = ("envelope", "name", "target")
    envelope: str
    name: str | None
    target: str | None

    def __init__(self, envelope: str, name: str | None = None, target: str | None = None) -> None:
        self._init(envelope=envelope, name=name, target=target)


class HostguardMetadata(Record):
    __slots__ = ("refs",)
    refs: tuple[EnvelopeRef, ...]  # the domain-wide ref first (if any), then per-disk refs in XML order

    def __init__(self, refs: tuple[EnvelopeRef, ...]) -> None:
        self._init(refs=refs)

    @property
    def domain_ref(self) -> EnvelopeRef | None:
        return next((r for r in self.refs if r.target is None), None)

    def ref_for(self, target: str) -> EnvelopeRef | None:
        """The envelope that covers disk `target`: its own, else the domain-wide one, else None."""
        own = next((r for r in self.refs if r.target == target), None)
        return own if own is not None else self.domain_ref


class FilesystemSpec(Record):
    """`<filesystem>`: a host directory/file shared into the guest (virtiofs, 9p, ...)."""

    __slots__ = ("driver", "readonly", "source", "target", "type")
    type: str  # mount | file | block | template | ram | bind | volume
    driver: str | None  # path | handle | virtiofs | loop | nbd | ploop | mtp
    source: str | None  # dir / file / dev / name / socket, whichever the type has
    target: str | None  # the mount tag (target dir)
    readonly: bool

    def __init__(
        self,
        type: str,
        driver: str | None,
        source: str | None,
        target: str | None,
        readonly: bool,
    ) -> None:
        self._init(type=type, driver=driver, source=source, target=target, readonly=readonly)


class HostdevSpec(Record):
    """A passed-through host device: `<hostdev>` (PCI, USB, SCSI, mdev, ...) or `<redirdev>` (USB redirection)."""

    __slots__ = ("element", "mode", "type")
    element: str  # hostdev | redirdev
    mode: str | None  # subsystem | capabilities (hostdev); None for redirdev
    type: str | None  # pci | usb | scsi | mdev | ... ; spicevmc | tcp | ... for redirdev

    def __init__(self, element: str, mode: str | None, type: str | None) -> None:
        self._init(element=element, mode=mode, type=type)


class HostFileSpec(Record):
    """Another host file the guest runs or reads: an option ROM, a fw_cfg blob, a file-backed memory device."""

    __slots__ = ("kind", "owner", "path")
    kind: str  # rom | fwcfg | memory
    owner: str  # which element names it ("interface #0", "opt/com.example/blob", "nvdimm #0")
    path: str | None  # None for a fw_cfg entry given inline

    def __init__(self, kind: str, owner: str, path: str | None) -> None:
        self._init(kind=kind, owner=owner, path=path)


class BootEntrySpec(Record):
    """A per-device `<boot order='N'/>`: `kind` is disk | cdrom | floppy | lun | network | hostdev | redirdev."""

    __slots__ = ("kind", "order", "owner")
    owner: str  # "disk vda", "interface #0"
    kind: str
    order: int

    def __init__(self, *, owner: str, kind: str, order: int) -> None:
        self._init(owner=owner, kind=kind, order=order)


class DomainSpec(Record):
    __slots__ = (
        "boot_order",
        "disks",
        "emulator",
        "filesystems",
        "host_files",
        "hostdevs",
        "hostguard",
        "name",
        "oem_strings",
        "os",
        "qemu_passthrough",
        "shmem",
        "type",
        "uuid",
        "vmcoreinfo",
    )
    name: str
    uuid: str  # canonical lower-case 8-4-4-4-12
    type: str  # kvm | qemu
    disks: tuple[DiskSpec, ...]
    os: OsSpec
    vmcoreinfo: bool
    hostguard: HostguardMetadata | None
    # Local names of <qemu:*> children of <domain> (commandline, override, ...): raw QEMU arguments that
    # can add drives or a kernel behind every check above. Policy should refuse a non-empty tuple.
    qemu_passthrough: tuple[str, ...]
    filesystems: tuple[FilesystemSpec, ...]
    hostdevs: tuple[HostdevSpec, ...]
    host_files: tuple[HostFileSpec, ...]
    emulator: str | None  # <devices><emulator>: the binary libvirt executes; None = libvirt's default
    boot_order: tuple[BootEntrySpec, ...]
    shmem: tuple[str, ...]  # names of <shmem> devices
    oem_strings: tuple[str, ...]  # SMBIOS type 11 strings, verbatim

    def __init__(
        self,
        name: str,
        uuid: str,
        type: str,
        disks: tuple[DiskSpec, ...],
        os: OsSpec,
        *,
        vmcoreinfo: bool = False,
        hostguard: HostguardMetadata | None = None,
        qemu_passthrough: tuple[str, ...] = (),
        filesystems: tuple[FilesystemSpec, ...] = (),
        hostdevs: tuple[HostdevSpec, ...] = (),
        host_files: tuple[HostFileSpec, ...] = (),
        emulator: str | None = None,
        boot_order: tuple[BootEntrySpec, ...] = (),
        shmem: tuple[str, ...] = (),
        oem_strings: tuple[str, ...] = (),
    ) -> None:
        self._init(
            name=name,
            uuid=uuid,
            type=type,
            disks=disks,
            os=os,
            vmcoreinfo=vmcoreinfo,
            hostguard=hostguard,
            qemu_passthrough=qemu_passthrough,
            filesystems=filesystems,
            hostdevs=hostdevs,
            host_files=host_files,
            emulator=emulator,
            boot_order=boot_order,
            shmem=shmem,
            oem_strings=oem_strings,
        )

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
