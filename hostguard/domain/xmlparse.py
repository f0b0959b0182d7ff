"""Parse a libvirt domain XML document (hostile bytes from the hook's stdin) into a typed `DomainSpec`.

Hardening, in order: size cap (`MAX_XML_BYTES`), strict UTF-8 (no NUL, no other declared encoding), no
DOCTYPE/ENTITY text at all, then lxml with entities, DTDs and network off (`resolve_entities=False,
no_network=True, load_dtd=False, huge_tree=False`), then no DOCTYPE in the parsed tree, no processing
instructions anywhere, at most `MAX_ELEMENTS` elements. Singleton elements that libvirt reads once (`<name>`,
`<os>`, a disk's `<source>` ...) must not repeat, so no reader can pick a different copy than libvirt did.
Every problem raises `DomainError` with one line; lxml exceptions never escape. lxml is imported lazily.

The hostguard metadata element binds the domain to signed envelopes. It lives directly in `<metadata>`, in
namespace `https://hostguard.dev/xmlns/domain/1` (conventional prefix `hostguard`); there is at most one
element of this namespace there and it must be `image`:

    <hostguard:image xmlns:hostguard="https://hostguard.dev/xmlns/domain/1"
                     envelope="/var/lib/hostguard/web.qcow2.hgsig" name="web"/>

    <hostguard:image xmlns:hostguard="https://hostguard.dev/xmlns/domain/1" envelope="/srv/os.hgsig">
      <hostguard:disk target="vdb" envelope="/srv/data.hgsig" name="data"/>
    </hostguard:image>

`envelope` on `image` is the domain-wide envelope (it covers every disk without a `disk` child and the boot
files). Each `disk` child binds one disk, by its `<target dev>`, to its own envelope. `name` is optional
everywhere: the image name the envelope's manifest must carry. Nothing else is allowed: no other attributes,
children or text, envelope paths are absolute, targets are unique and name a disk of the domain, and at least
one envelope is given. Elements of other namespaces in `<metadata>` are ignored. Since
`virDomainSetMetadata` replaces the whole element of a namespace, anything else hostguard stores in a
domain's metadata (verdicts) must use a different namespace URI.
"""

from __future__ import annotations

import re

from hostguard.domain.paths import ambiguity
from hostguard.domain.spec import (
    AcpiTableSpec,
    BackingSpec,
    BootEntrySpec,
    DiskSpec,
    DomainSpec,
    EnvelopeRef,
    FilesystemSpec,
    HostdevSpec,
    HostFileSpec,
    HostguardMetadata,
    OsSpec,
    SourceSpec,
)
from hostguard.errors import DomainError

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from typing import Any

    from lxml import etree  # lazy: keeps the hook start-up light

__all__ = [
    "AcpiTableSpec",
    "BackingSpec",
    "DiskSpec",
    "DomainSpec",
    "EnvelopeRef",
    "FilesystemSpec",
    "HostFileSpec",
    "HostdevSpec",
    "HostguardMetadata",
    "OsSpec",
    "SourceSpec",
    "parse_domain_xml",
]

HOSTGUARD_NS = "https://hostguard.dev/xmlns/domain/1"
HOSTGUARD_PREFIX = "hostguard"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

MAX_XML_BYTES = 1024 * 1024
MAX_ELEMENTS = 20_000
MAX_DISKS = 1024
MAX_BACKING_DEPTH = 64
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 256
MAX_CMDLINE_CHARS = 64 * 1024

DOMAIN_TYPES = ("kvm", "qemu")
DISK_DEVICES = ("disk", "cdrom", "floppy", "lun")
SOURCE_KINDS = ("file", "block", "network", "dir", "volume", "nvme", "vhostuser")
# The attribute of <source> that holds the host path, for the kinds that have one.
_PATH_ATTR = {"file": "file", "block": "dev", "dir": "dir", "vhostuser": "path"}

# Patterns as strings, compiled by `re` on first use (and cached there): a hook run whose parse comes from the
# cache never pays for compiling them.
_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
_SIMPLE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"
_CONTROL = r"[\x00-\x1f\x7f]"
_FORBIDDEN_MARKUP = rb"(?i)<!\s*(DOCTYPE|ENTITY)"
_XML_DECL_ENCODING = rb"\A(?:\xef\xbb\xbf)?<\?xml[^>]*?\bencoding\s*=\s*[\"']([^\"']*)[\"']"


# --- parsing ----------------------------------------------------------------------------------------------


def parse_domain_xml(data: bytes) -> DomainSpec:
    """Parse and validate domain XML bytes. Raises `DomainError` for anything hostile or malformed."""
    root = _parse_hardened(data)
    if root.tag != "domain":
        raise DomainError(f"domain XML: root element is <{_describe_tag(root.tag)}>, not <domain>")
    dom_type = root.get("type")
    if dom_type not in DOMAIN_TYPES:
        raise DomainError(f"domain XML: domain type {_show(dom_type)} is not one of {'/'.join(DOMAIN_TYPES)}")
    # Verbatim, as libvirt reads it: an exemption or a record must not match a normalised name.
    name = _text(_need(root, "name", "domain"), "domain name", MAX_NAME_CHARS, strip=False)
    if name is None or not name.strip():
        raise DomainError("domain XML: <name> is empty")
    why = ambiguity(name)
    if why is not None:
        raise DomainError(f"domain XML: domain name {_show(name)} {why}")
    uuid_text = _text(_need(root, "uuid", "domain"), "domain uuid", 64, strip=True)  # virUUIDParse skips blanks
    if uuid_text is None or not re.fullmatch(_UUID, uuid_text):
        raise DomainError(f"domain XML: uuid {_show(uuid_text)} is not a UUID")
    hexdigits = uuid_text.replace("-", "").lower()
    uuid = f"{hexdigits[:8]}-{hexdigits[8:12]}-{hexdigits[12:16]}-{hexdigits[16:20]}-{hexdigits[20:]}"

    devices = _one(root, "devices", "domain")
    disk_elems = [] if devices is None else devices.findall("disk")
    if len(disk_elems) > MAX_DISKS:
        raise DomainError(f"domain XML: more than {MAX_DISKS} disks")
    disks = tuple(_parse_disk(elem, i) for i, elem in enumerate(disk_elems))
    seen: set[str] = set()
    for disk in disks:
        if disk.target in seen:
            raise DomainError(f"domain XML: two disks use target {disk.target!r}")
        seen.add(disk.target)

    hostguard = _parse_metadata(_one(root, "metadata", "domain"), seen)
    passthrough = sorted({_local(c.tag) for c in root if isinstance(c.tag, str) and _ns(c.tag) == QEMU_NS})
    return DomainSpec(
        name=name,
        uuid=uuid,
        type=dom_type,
        disks=disks,
        os=_parse_os(_one(root, "os", "domain")),
        vmcoreinfo=_parse_vmcoreinfo(_one(root, "features", "domain")),
        hostguard=hostguard,
        qemu_passthrough=tuple(passthrough),
        filesystems=() if devices is None else _parse_filesystems(devices),
        hostdevs=() if devices is None else _parse_hostdevs(devices),
        host_files=_parse_host_files(root, devices),
        emulator=None if devices is None else _parse_emulator(devices),
        boot_order=_parse_boot_order(devices),
        shmem=() if devices is None else _parse_shmem(devices),
        oem_strings=_parse_oem_strings(root),
    )


def _parse_hardened(data: bytes) -> etree._Element:
    if not isinstance(data, bytes):
        raise DomainError("domain XML: input must be bytes")
    if len(data) > MAX_XML_BYTES:
        raise DomainError(f"domain XML: {len(data)} bytes exceeds the limit of {MAX_XML_BYTES}")
    if not data.strip():
        raise DomainError("domain XML: input is empty")
    try:
        data.decode("utf-8", "strict")
    except UnicodeDecodeError as err:
        raise DomainError(f"domain XML: not valid UTF-8 at byte {err.start}") from None
    if b"\x00" in data:
        raise DomainError("domain XML: contains a NUL byte")
    m = re.match(_XML_DECL_ENCODING, data)
    if m and m.group(1).lower() not in (b"utf-8", b"utf8"):
        encoding = m.group(1)[:40].decode("ascii", "replace")
        raise DomainError(f"domain XML: declared encoding {encoding!r} is not allowed, only UTF-8")
    m2 = re.search(_FORBIDDEN_MARKUP, data)
    if m2:
        raise DomainError(f"domain XML: {m2.group(1).decode().upper()} is not allowed")

    from lxml import etree  # lazy: keeps the hook start-up light

    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=False,  # kept so that they are seen and refused below
        encoding="utf-8",
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as err:
        raise DomainError(f"domain XML: not well-formed: {str(err)[:200]}") from None
    except (etree.LxmlError, ValueError) as err:  # lxml's other refusals (e.g. internal limits)
        raise DomainError(f"domain XML: cannot parse: {str(err)[:200]}") from None
    docinfo: Any = root.getroottree().docinfo  # lxml-stubs lack DocInfo.doctype
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise DomainError("domain XML: DOCTYPE is not allowed")
    if any(True for _ in root.itersiblings(preceding=True)) or any(True for _ in root.itersiblings()):
        raise DomainError("domain XML: processing instruction is not allowed")
    for count, node in enumerate(root.iter(), start=1):
        if not isinstance(node.tag, str):  # PIs, entities (comments are already removed)
            raise DomainError("domain XML: processing instruction is not allowed")
        if count > MAX_ELEMENTS:
            raise DomainError(f"domain XML: more than {MAX_ELEMENTS} elements")
    return root


def _parse_disk(elem: etree._Element, index: int) -> DiskSpec:
    target_elem = _need(elem, "target", f"disk #{index}")
    target = _attr_token(target_elem, "dev", f"disk #{index} target")
    if target is None:
        raise DomainError(f"domain XML: disk #{index} has no <target dev>")
    what = f"disk {target}"
    device = elem.get("device", "disk")  # libvirt's default
    if device not in DISK_DEVICES:
        raise DomainError(f"domain XML: {what} has unsupported device {_show(device)}")
    kind = elem.get("type", "file")  # libvirt's default
    if kind not in SOURCE_KINDS:
        raise DomainError(f"domain XML: {what} has unsupported source type {_show(kind)}")
    driver = _one(elem, "driver", what)
    fmt = None if driver is None else _attr_token(driver, "type", f"{what} driver")
    chain, end = _parse_backing_chain(elem, what)
    return DiskSpec(
        device=device,
        source=_parse_source(kind, _one(elem, "source", what), what),
        format=fmt,
        target=target,
        readonly=_one(elem, "readonly", what) is not None,
        backing_chain=chain,
        backing_end=end,
        data_store=any(True for _ in elem.iter("dataStore")),
    )


def _parse_source(kind: str, src: etree._Element | None, what: str) -> SourceSpec:
    if src is None:
        return SourceSpec(kind)
    if kind in _PATH_ATTR:
        return SourceSpec(kind, path=_path(src.get(_PATH_ATTR[kind]), f"{what} source"))
    if kind == "network":
        protocol = _attr_token(src, "protocol", f"{what} source")
        if protocol is None:
            raise DomainError(f"domain XML: {what} network source has no protocol")
        return SourceSpec(kind, protocol=protocol, name=_attr_text(src, "name", f"{what} source"))
    if kind == "volume":
        return SourceSpec(
            kind,
            pool=_attr_text(src, "pool", f"{what} source"),
            volume=_attr_text(src, "volume", f"{what} source"),
        )
    return SourceSpec(kind)  # nvme: a PCI address, no host path


def _parse_backing_chain(disk: etree._Element, what: str) -> tuple[tuple[BackingSpec, ...], bool]:
    """The XML's backing chain (outermost first) and whether it ends in libvirt's terminator.

    libvirt (with -blockdev) builds the chain from these elements, probes the image headers only below the
    last one, and stops at a `<backingStore>` without `type` (the terminator: "no backing file", whatever
    the header says). A typeless element with children is a terminator to libvirt but reads like a layer:
    refused as ambiguous."""
    chain: list[BackingSpec] = []
    node = _one(disk, "backingStore", what)
    while node is not None:
        if node.get("type") is None:
            if len(node) or (node.text or "").strip():
                raise DomainError(
                    f"domain XML: {what} has a <backingStore> without type but with content: libvirt reads it as "
                    "the end of the chain (<backingStore/>); give the layer a type or leave it empty"
                )
            return tuple(chain), True
        if len(chain) >= MAX_BACKING_DEPTH:
            raise DomainError(f"domain XML: {what} backing chain is deeper than {MAX_BACKING_DEPTH}")
        here = f"{what} backingStore #{len(chain) + 1}"
        kind = node.get("type", "file")
        if kind not in SOURCE_KINDS:
            raise DomainError(f"domain XML: {here} has unsupported type {_show(kind)}")
        fmt_elem = _one(node, "format", here)
        chain.append(
            BackingSpec(
                source=_parse_source(kind, _one(node, "source", here), here),
                format=None if fmt_elem is None else _attr_token(fmt_elem, "type", f"{here} format"),
            )
        )
        node = _one(node, "backingStore", here)
    return tuple(chain), False


def _parse_os(os_elem: etree._Element | None) -> OsSpec:
    if os_elem is None:
        return OsSpec()
    loader = _one(os_elem, "loader", "os")
    nvram = _one(os_elem, "nvram", "os")
    nvram_path = None
    if nvram is not None:
        nvram_kind = nvram.get("type", "file")
        if nvram_kind not in ("file", "block"):
            raise DomainError(f"domain XML: nvram type {_show(nvram_kind)} is not supported")
        src = _one(nvram, "source", "nvram")
        if src is None:  # <nvram>/path</nvram>
            nvram_path = _path(_text(nvram, "nvram"), "nvram")
        else:  # <nvram type='file'><source file='/path'/></nvram> (libvirt >= 8.5)
            nvram_path = _path(src.get("file" if nvram_kind == "file" else "dev"), "nvram")
    firmware = os_elem.get("firmware")
    if firmware is not None and firmware not in ("efi", "bios"):
        raise DomainError(f"domain XML: os firmware {_show(firmware)} is not efi or bios")
    acpi = _one(os_elem, "acpi", "os")
    tables = tuple(
        AcpiTableSpec(
            type=_attr_token(t, "type", "acpi table") or "raw",
            path=_path(_text(t, "acpi table", MAX_PATH_CHARS), "acpi table"),
        )
        for t in ([] if acpi is None else acpi.findall("table"))
    )
    return OsSpec(
        kernel=_path(_text(_one(os_elem, "kernel", "os"), "kernel", MAX_PATH_CHARS), "kernel"),
        initrd=_path(_text(_one(os_elem, "initrd", "os"), "initrd", MAX_PATH_CHARS), "initrd"),
        cmdline=_text(_one(os_elem, "cmdline", "os"), "cmdline", MAX_CMDLINE_CHARS, strip=False),
        dtb=_path(_text(_one(os_elem, "dtb", "os"), "dtb", MAX_PATH_CHARS), "dtb"),
        loader=_path(_text(loader, "loader", MAX_PATH_CHARS), "loader"),
        loader_type=None if loader is None else _attr_token(loader, "type", "loader"),
        loader_readonly=loader is not None and loader.get("readonly") == "yes",
        nvram=nvram_path,
        nvram_template=None if nvram is None else _path(nvram.get("template"), "nvram template"),
        firmware=firmware,
        acpi_tables=tables,
        boot_devs=tuple(_attr_token(b, "dev", "os boot") or "?" for b in os_elem.findall("boot")),
    )


# --- other host content handed to the guest ---------------------------------------------------------------


def _parse_filesystems(devices: etree._Element) -> tuple[FilesystemSpec, ...]:
    out: list[FilesystemSpec] = []
    for i, fs in enumerate(devices.findall("filesystem")):
        what = f"filesystem #{i}"
        driver = _one(fs, "driver", what)
        src = _one(fs, "source", what)
        source = None
        if src is not None:  # the attribute depends on the type: dir, file, dev, name (template), socket
            source = next(
                (_attr_text(src, a, f"{what} source") for a in ("dir", "file", "dev", "name", "socket") if src.get(a)),
                None,
            )
        target = _one(fs, "target", what)
        out.append(
            FilesystemSpec(
                type=_attr_token(fs, "type", what) or "mount",
                driver=None if driver is None else _attr_token(driver, "type", f"{what} driver"),
                source=source,
                target=None if target is None else _attr_text(target, "dir", f"{what} target"),
                readonly=_one(fs, "readonly", what) is not None,
            )
        )
    return tuple(out)


def _parse_hostdevs(devices: etree._Element) -> tuple[HostdevSpec, ...]:
    out = [
        HostdevSpec("hostdev", _attr_token(h, "mode", "hostdev") or "subsystem", _attr_token(h, "type", "hostdev"))
        for h in devices.findall("hostdev")
    ]
    out += [HostdevSpec("redirdev", None, _attr_token(r, "type", "redirdev")) for r in devices.findall("redirdev")]
    return tuple(out)


def _parse_host_files(root: etree._Element, devices: etree._Element | None) -> tuple[HostFileSpec, ...]:
    """Option ROMs of any device, fw_cfg entries, file-backed memory devices (nvdimm, virtio-pmem)."""
    out: list[HostFileSpec] = []
    counts: dict[str, int] = {}
    for dev in [] if devices is None else devices:
        if not isinstance(dev.tag, str):
            continue
        index = counts.get(dev.tag, 0)
        counts[dev.tag] = index + 1
        owner = f"{_describe_tag(dev.tag)} #{index}"
        rom = _one(dev, "rom", owner)
        if rom is not None:  # file='' switches the ROM off; no file means the device's default ROM
            path = _path(rom.get("file"), f"{owner} rom")
            if path is not None:
                out.append(HostFileSpec("rom", owner, path))
        if dev.tag == "memory":
            src = _one(dev, "source", owner)
            path = None if src is None else _path(_text(_one(src, "path", owner), "path", MAX_PATH_CHARS), "memory")
            if path is not None:
                out.append(HostFileSpec("memory", f"{dev.get('model', 'memory')[:40]} #{index}", path))
    for sysinfo in root.findall("sysinfo"):
        if sysinfo.get("type") != "fwcfg":
            continue
        for entry in sysinfo.findall("entry"):
            name = _attr_text(entry, "name", "fw_cfg entry") or "?"
            out.append(HostFileSpec("fwcfg", name, _path(entry.get("file"), "fw_cfg entry")))
    return tuple(out)


def _parse_boot_order(devices: etree._Element | None) -> tuple[BootEntrySpec, ...]:
    """Per-device `<boot order='N'/>` of disks, interfaces, host and redirected devices."""
    out: list[BootEntrySpec] = []
    for tag in ("disk", "interface", "hostdev", "redirdev"):
        for index, dev in enumerate([] if devices is None else devices.findall(tag)):
            boot = _one(dev, "boot", f"{tag} #{index}")
            if boot is None:
                continue
            raw = boot.get("order", "")
            if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 1 << 31:
                raise DomainError(f"domain XML: {tag} #{index} boot order {_show(raw)} is not a positive number")
            if tag == "disk":
                target = _one(dev, "target", f"disk #{index}")
                device = dev.get("device", "disk")
                owner = f"{device} {'?' if target is None else target.get('dev', '?')[:40]}"
                kind = "disk" if device == "disk" else device
            else:
                owner, kind = f"{tag} #{index}", "network" if tag == "interface" else tag
            out.append(BootEntrySpec(owner=owner, kind=kind, order=int(raw)))
    return tuple(out)


def _parse_emulator(devices: etree._Element) -> str | None:
    return _path(_text(_one(devices, "emulator", "devices"), "emulator"), "emulator")


def _parse_shmem(devices: etree._Element) -> tuple[str, ...]:
    """The names of `<shmem>` devices (host shared memory mapped into the guest)."""
    return tuple((_attr_text(s, "name", "shmem") or "?")[:80] for s in devices.findall("shmem"))


def _parse_oem_strings(root: etree._Element) -> tuple[str, ...]:
    """SMBIOS type 11 strings of every `<sysinfo type='smbios'>`, verbatim (systemd matches them by prefix)."""
    out: list[str] = []
    for sysinfo in root.findall("sysinfo"):
        if sysinfo.get("type") != "smbios":
            continue
        for oem in sysinfo.findall("oemStrings"):
            out += [_text(e, "oemStrings entry", MAX_CMDLINE_CHARS) or "" for e in oem.findall("entry")]
    return tuple(out)


def _parse_vmcoreinfo(features: etree._Element | None) -> bool:
    elem = None if features is None else _one(features, "vmcoreinfo", "features")
    if elem is None:
        return False
    state = elem.get("state", "on")
    if state not in ("on", "off"):
        raise DomainError(f"domain XML: vmcoreinfo state {_show(state)} is not on or off")
    return state == "on"


def _parse_metadata(metadata: etree._Element | None, targets: set[str]) -> HostguardMetadata | None:
    if metadata is None:
        return None
    ours = [c for c in metadata if isinstance(c.tag, str) and _ns(c.tag) == HOSTGUARD_NS]
    if not ours:
        return None
    if len(ours) > 1:
        raise DomainError("domain XML: hostguard metadata appears more than once")
    image = ours[0]
    if _local(image.tag) != "image":
        raise DomainError(f"domain XML: hostguard metadata is <{_local(image.tag)[:40]}>, not <image>")
    _only_attrs(image, ("envelope", "name"), "hostguard:image")
    _no_text(image, "hostguard:image")
    refs: list[EnvelopeRef] = []
    if image.get("envelope") is not None:
        refs.append(_envelope_ref(image, None, "hostguard:image"))
    seen: set[str] = set()
    for child in image:
        if not isinstance(child.tag, str) or child.tag != f"{{{HOSTGUARD_NS}}}disk":
            raise DomainError(f"domain XML: hostguard:image has an unexpected <{_describe_tag(child.tag)}>")
        _only_attrs(child, ("target", "envelope", "name"), "hostguard:disk")
        _no_text(child, "hostguard:disk")
        if len(child):
            raise DomainError("domain XML: hostguard:disk must be empty")
        target = _attr_token(child, "target", "hostguard:disk")
        if target is None:
            raise DomainError("domain XML: hostguard:disk lacks target")
        if target in seen:
            raise DomainError(f"domain XML: hostguard:disk target {target!r} appears twice")
        if target not in targets:
            raise DomainError(f"domain XML: hostguard:disk target {target!r} is not a disk of this domain")
        seen.add(target)
        refs.append(_envelope_ref(child, target, f"hostguard:disk {target}"))
    if not refs:
        raise DomainError("domain XML: hostguard:image names no envelope")
    return HostguardMetadata(tuple(refs))


def _envelope_ref(elem: etree._Element, target: str | None, what: str) -> EnvelopeRef:
    envelope = _path(elem.get("envelope"), f"{what} envelope")
    if envelope is None:
        raise DomainError(f"domain XML: {what} lacks envelope")
    name = elem.get("name")
    if name is not None and (not name or len(name) > MAX_NAME_CHARS or re.search(_CONTROL, name)):
        raise DomainError(f"domain XML: {what} name must be 1..{MAX_NAME_CHARS} printable characters")
    return EnvelopeRef(envelope=envelope, name=name, target=target)


# --- small helpers ----------------------------------------------------------------------------------------


def _one(parent: etree._Element, tag: str, what: str) -> etree._Element | None:
    """The child `tag` if present. A repeated singleton is refused: libvirt would read only one of them."""
    found = parent.findall(tag)
    if len(found) > 1:
        raise DomainError(f"domain XML: {what} has more than one <{tag}>")
    return found[0] if found else None


def _need(parent: etree._Element, tag: str, what: str) -> etree._Element:
    found = _one(parent, tag, what)
    if found is None:
        raise DomainError(f"domain XML: {what} lacks <{tag}>")
    return found


def _text(elem: etree._Element | None, what: str, limit: int = MAX_PATH_CHARS, *, strip: bool = False) -> str | None:
    """The element's text as libvirt reads it (verbatim unless `strip`); None when absent or empty."""
    if elem is None:
        return None
    if len(elem):
        raise DomainError(f"domain XML: <{what}> must hold text only")
    text = elem.text or ""
    if strip:
        text = text.strip()
    if len(text) > limit:
        raise DomainError(f"domain XML: {what} is longer than {limit} characters")
    return text or None


def _path(value: str | None, what: str) -> str | None:
    """An absolute host path exactly as libvirt passes it on, or None when absent/empty (libvirt treats an empty
    path as none). Leading/trailing whitespace and invisible characters are refused (`paths.ambiguity`)."""
    if value is None or value == "":
        return None
    if len(value) > MAX_PATH_CHARS:
        raise DomainError(f"domain XML: {what} path is longer than {MAX_PATH_CHARS} characters")
    why = ambiguity(value)
    if why is not None:
        raise DomainError(f"domain XML: {what} path {value[:80]!r} {why}")
    if not value.startswith("/"):
        raise DomainError(f"domain XML: {what} path {value[:80]!r} is not absolute")
    return value


def _attr_text(elem: etree._Element, attr: str, what: str) -> str | None:
    value = elem.get(attr)
    if value is None or value == "":
        return None
    if len(value) > MAX_PATH_CHARS or re.search(_CONTROL, value):
        raise DomainError(f"domain XML: {what} {attr} is too long or contains a control character")
    return value


def _attr_token(elem: etree._Element, attr: str, what: str) -> str | None:
    value = elem.get(attr)
    if value is None:
        return None
    if not re.fullmatch(_SIMPLE_NAME, value):
        raise DomainError(f"domain XML: {what} {attr} {_show(value)} is not a simple name")
    return value


def _only_attrs(elem: etree._Element, allowed: tuple[str, ...], what: str) -> None:
    for key in elem.keys():  # noqa: SIM118 - lxml attrib keys, not a dict
        if key not in allowed:
            raise DomainError(f"domain XML: {what} has unexpected attribute {_describe_tag(key)!r}")


def _no_text(elem: etree._Element, what: str) -> None:
    pieces = [elem.text] + [child.tail for child in elem]
    if any(p and p.strip() for p in pieces):
        raise DomainError(f"domain XML: {what} must not contain text")


def _ns(tag: str) -> str | None:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _describe_tag(tag: object) -> str:
    if not isinstance(tag, str):
        return "?"
    ns = _ns(tag)
    local = _local(tag)[:40]
    return local if ns is None else f"{{{ns[:80]}}}{local}"


def _show(value: str | None) -> str:
    return "(none)" if value is None else repr(value[:40])
