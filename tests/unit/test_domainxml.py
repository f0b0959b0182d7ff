"""hostguard.domain.xmlparse: hostile domain XML is refused with one-line DomainErrors; real libvirt XML parses."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostguard.domain import xmlparse as domainxml
from hostguard.domain.xmlparse import (
    HOSTGUARD_NS,
    MAX_ELEMENTS,
    MAX_XML_BYTES,
    BackingSpec,
    DomainSpec,
    EnvelopeRef,
    SourceSpec,
    parse_domain_xml,
)
from hostguard.errors import DomainError

DATA = Path(__file__).parent / "data" / "domainxml"
UUID = "dc1efd3f-d54a-4aa1-9a77-c39c9a611ff3"
HG = f'xmlns:hostguard="{HOSTGUARD_NS}"'


def domain(
    devices: str = "",
    *,
    metadata: str | None = None,
    os: str = "<type arch='x86_64' machine='pc'>hvm</type>",
    features: str = "",
    head: str = "",
    dom_type: str = "qemu",
    extra: str = "",
) -> bytes:
    meta = "" if metadata is None else f"<metadata>{metadata}</metadata>"
    return (
        f"{head}<domain type='{dom_type}'><name>t1</name><uuid>{UUID}</uuid>{meta}"
        f"<memory unit='MiB'>128</memory><os>{os}</os><features>{features}</features>"
        f"<devices>{devices}</devices>{extra}</domain>"
    ).encode()


def file_disk(target: str = "vda", path: str = "/var/lib/libvirt/images/a.qcow2", fmt: str = "qcow2") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
    )


def refused(data: bytes, match: str) -> DomainError:
    with pytest.raises(DomainError) as info:
        parse_domain_xml(data)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(match, message), message
    return info.value


# --- attacks on the XML parser ------------------------------------------------------------------------------

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE domain [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<domain type='qemu'><name>&xxe;</name><uuid>dc1efd3f-d54a-4aa1-9a77-c39c9a611ff3</uuid></domain>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain type='qemu'><name>&lol9;</name><uuid>dc1efd3f-d54a-4aa1-9a77-c39c9a611ff3</uuid></domain>"""


@pytest.fixture
def no_byte_precheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disable the byte-level DOCTYPE/ENTITY refusal to prove the parser-level defences on their own."""
    monkeypatch.setattr(domainxml, "_FORBIDDEN_MARKUP", re.compile(rb"(?!)"))


def test_external_entity_file_etc_passwd_is_refused() -> None:
    err = refused(XXE, r"^[a-z ]+: domain XML: DOCTYPE is not allowed$")
    assert "root:" not in str(err)


@pytest.mark.usefixtures("no_byte_precheck")
def test_external_entity_is_refused_by_the_parser_layer_alone() -> None:
    err = refused(XXE, "DOCTYPE is not allowed")
    assert "root:" not in str(err)


def test_billion_laughs_is_refused_quickly() -> None:
    start = time.monotonic()
    refused(BILLION_LAUGHS, "DOCTYPE is not allowed")
    assert time.monotonic() - start < 1.0


@pytest.mark.usefixtures("no_byte_precheck")
def test_billion_laughs_is_refused_by_the_parser_layer_alone() -> None:
    start = time.monotonic()
    refused(BILLION_LAUGHS, "DOCTYPE is not allowed|amplification")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    "prolog",
    [
        b"<!DOCTYPE domain>",
        b"<!doctype domain>",
        b'<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/evil.dtd">',
        b'<!DOCTYPE domain PUBLIC "-//x//y" "file:///etc/passwd">',
        b"<!DOCTYPE domain [ <!ELEMENT domain ANY> ]>",
        b'<!DOCTYPE domain [ <!ENTITY % p SYSTEM "file:///etc/passwd"> %p; ]>',
    ],
)
def test_doctype_in_any_form_is_refused(prolog: bytes) -> None:
    refused(prolog + domain(), "DOCTYPE is not allowed")


@pytest.mark.usefixtures("no_byte_precheck")
@pytest.mark.parametrize(
    "prolog",
    [
        b"<!DOCTYPE domain>",
        b'<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/evil.dtd">',
        b'<!DOCTYPE domain [ <!ENTITY % p SYSTEM "file:///etc/passwd"> %p; ]>',
    ],
)
def test_doctype_is_refused_by_the_parser_layer_alone(prolog: bytes) -> None:
    refused(prolog + domain(), "DOCTYPE|not well-formed")


def test_entity_declaration_outside_a_doctype_is_refused() -> None:
    refused(domain(extra='<!ENTITY x "y">'), "ENTITY is not allowed")


def test_undefined_entity_reference_is_refused() -> None:
    refused(domain(extra="<x>&foo;</x>"), "not well-formed")


def test_oversized_document_is_refused_before_parsing() -> None:
    padding = b" " * (MAX_XML_BYTES + 1)
    refused(domain().replace(b"</domain>", padding + b"</domain>"), "exceeds the limit of 1048576")


def test_document_just_under_the_size_cap_parses() -> None:
    data = domain()
    data = data.replace(b"</domain>", b" " * (MAX_XML_BYTES - len(data)) + b"</domain>")
    assert len(data) == MAX_XML_BYTES
    assert parse_domain_xml(data).name == "t1"


def test_element_flood_is_refused() -> None:
    refused(domain(extra="<x/>" * (MAX_ELEMENTS + 1)), f"more than {MAX_ELEMENTS} elements")


def test_deep_nesting_is_refused() -> None:
    refused(domain(extra="<x>" * 5000 + "</x>" * 5000), "not well-formed|cannot parse")


@pytest.mark.parametrize(
    "data",
    [
        b'<?xml-stylesheet href="http://evil/x.xsl"?>' + domain(),
        domain(extra="<?php system('id'); ?>"),
        domain(devices="<?x y?>" + file_disk()),
        domain() + b"<?trailing pi?>",
    ],
    ids=["before-root", "in-root", "in-devices", "after-root"],
)
def test_processing_instruction_is_refused(data: bytes) -> None:
    refused(data, "processing instruction is not allowed")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (domain().replace(b"t1", "t\u00e9".encode("latin-1")), "not valid UTF-8 at byte"),
        ('<?xml version="1.0" encoding="UTF-16"?>'.encode("utf-16") + domain(), "not valid UTF-8"),
        (b'<?xml version="1.0" encoding="ISO-8859-1"?>' + domain(), "encoding 'ISO-8859-1' is not allowed"),
        (b'<?xml version="1.0" encoding="UTF-16"?>' + domain(), "encoding 'UTF-16' is not allowed"),
        (domain().replace(b"t1", b"t\x001"), "NUL byte"),
    ],
    ids=["latin-1-bytes", "utf-16-bom", "declared-latin-1", "declared-utf-16", "nul-byte"],
)
def test_non_utf8_input_is_refused(data: bytes, match: str) -> None:
    refused(data, match)


def test_utf8_with_declaration_and_bom_parses() -> None:
    data = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>' + domain().replace(b"t1", "t\u00e9".encode())
    assert parse_domain_xml(data).name == "t\u00e9"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"<network><name>x</name></network>", "root element is <network>, not <domain>"),
        (b'<x:domain xmlns:x="urn:x" type="qemu"/>', r"root element is <\{urn:x\}domain>"),
        (b"", "input is empty"),
        (b"   \n", "input is empty"),
        (b"not xml at all", "not well-formed"),
        (b"<domain type='qemu'>", "not well-formed"),
        (domain(dom_type="xen"), "domain type 'xen' is not one of kvm/qemu"),
        (domain().replace(b" type='qemu'", b""), r"domain type \(none\)"),
    ],
)
def test_not_a_qemu_domain_root_is_refused(data: bytes, match: str) -> None:
    refused(data, match)


def test_input_must_be_bytes() -> None:
    with pytest.raises(DomainError, match="must be bytes"):
        parse_domain_xml(domain().decode())  # type: ignore[arg-type]


def test_xinclude_is_not_processed() -> None:
    xi = "<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd' parse='text'/>"
    spec = parse_domain_xml(domain(extra=xi))
    assert "root:" not in repr(spec)


def test_comments_are_ignored() -> None:
    data = b"<!-- leading -->" + domain(devices="<!-- c -->" + file_disk()) + b"<!-- trailing -->"
    assert parse_domain_xml(data).disks[0].target == "vda"


def test_lxml_errors_never_escape() -> None:
    # Errors from lxml itself (syntax, depth) arrive as DomainError without a chained traceback.
    with pytest.raises(DomainError) as info:
        parse_domain_xml(b"<domain><unclosed></domain>")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# --- the domain's identity ----------------------------------------------------------------------------------


def test_name_uuid_and_type() -> None:
    spec = parse_domain_xml(domain(dom_type="kvm").replace(UUID.encode(), UUID.upper().replace("-", "").encode()))
    assert (spec.name, spec.uuid, spec.type) == ("t1", UUID, "kvm")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (domain().replace(f"<uuid>{UUID}</uuid>".encode(), b""), "domain lacks <uuid>"),
        (domain().replace(UUID.encode(), b"not-a-uuid"), "uuid 'not-a-uuid' is not a UUID"),
        (domain().replace(b"<name>t1</name>", b"<name> </name>"), "<name> is empty"),
        (domain().replace(b"<name>t1</name>", b"<name>a</name><name>b</name>"), "more than one <name>"),
        (domain().replace(b"<name>t1</name>", b"<name>" + b"n" * 300 + b"</name>"), "longer than 256"),
    ],
)
def test_bad_identity_is_refused(data: bytes, match: str) -> None:
    refused(data, match)


# --- disks --------------------------------------------------------------------------------------------------


def test_libvirt9_dump_with_every_disk_kind() -> None:
    spec = parse_domain_xml((DATA / "libvirt9_all_disk_kinds.xml").read_bytes())
    assert isinstance(spec, DomainSpec)
    assert (spec.name, spec.uuid, spec.type) == ("all-disk-kinds", UUID, "qemu")
    by_target = {d.target: d for d in spec.disks}
    assert list(by_target) == ["vda", "vdb", "vdc", "vdd", "vde", "vdf", "vdg", "sda", "fda", "sdb"]
    images = "/var/lib/libvirt/images"

    vda = by_target["vda"]
    assert (vda.device, vda.format, vda.readonly) == ("disk", "qcow2", False)
    assert vda.source == SourceSpec("file", path=f"{images}/ov.qcow2")
    assert vda.backing_chain == (BackingSpec(SourceSpec("file", path=f"{images}/base.qcow2"), "qcow2"),)
    assert by_target["vdb"].source == SourceSpec("block", path="/dev/loop0")
    assert by_target["vdc"].source == SourceSpec("network", protocol="nbd", name="foo")
    assert by_target["vdd"].source == SourceSpec("volume", pool="default", volume="x.qcow2")
    assert by_target["vdd"].format is None  # libvirt leaves a volume's format to the pool
    assert by_target["vdf"].source == SourceSpec("nvme")
    assert by_target["vdg"].source == SourceSpec("vhostuser", path="/tmp/vhost.sock")
    sda = by_target["sda"]
    assert (sda.device, sda.readonly, sda.source.path) == ("cdrom", True, f"{images}/cd.iso")
    fda = by_target["fda"]
    assert (fda.device, fda.format, fda.source) == ("floppy", "fat", SourceSpec("dir", path=images))
    assert (by_target["sdb"].device, by_target["sdb"].source.kind) == ("lun", "block")
    assert not any(d.data_store or d.empty for d in spec.disks)
    assert all(d.backing_chain == () for d in spec.disks if d.target != "vda")

    assert spec.os.kernel == "/boot/vmlinuz-6.1.0-56-amd64"
    assert spec.os.initrd == "/tmp/initrd.img"
    assert spec.os.cmdline == "console=ttyS0 root=/dev/vda"
    assert (spec.os.loader, spec.os.loader_type, spec.os.loader_readonly) == (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "pflash",
        True,
    )
    assert spec.os.nvram == "/var/lib/libvirt/qemu/nvram/x_VARS.fd"
    assert spec.vmcoreinfo is True
    assert spec.hostguard is not None
    assert spec.hostguard.refs == (EnvelopeRef("/var/lib/x.hgsig"),)
    assert spec.qemu_passthrough == ()


def test_libvirt9_live_xml_of_a_running_overlay() -> None:
    spec = parse_domain_xml((DATA / "libvirt9_live_overlay.xml").read_bytes())
    (disk,) = spec.disks
    assert disk.source.path == "/var/lib/libvirt/images/live.qcow2"
    assert disk.backing_chain == (BackingSpec(SourceSpec("file", path="/var/lib/libvirt/images/base.qcow2"), "qcow2"),)
    assert spec.hostguard is not None
    assert spec.hostguard.refs == (EnvelopeRef("/var/lib/hostguard/x.hgsig", name="web"),)
    assert spec.disk("vda") is disk
    assert spec.disk("vdz") is None


def test_missing_driver_type_gives_none() -> None:
    no_type = "<disk type='file' device='disk'><driver name='qemu'/><source file='/i/a.img'/><target dev='vda'/></disk>"
    no_driver = "<disk type='file' device='disk'><source file='/i/b.img'/><target dev='vdb'/></disk>"
    spec = parse_domain_xml(domain(no_type + no_driver))
    assert [d.format for d in spec.disks] == [None, None]


def test_type_and_device_default_like_libvirt() -> None:
    spec = parse_domain_xml(domain("<disk><source file='/i/a.img'/><target dev='vda'/></disk>"))
    assert (spec.disks[0].device, spec.disks[0].source.kind) == ("disk", "file")


def test_empty_cdrom_has_no_source_path() -> None:
    spec = parse_domain_xml(domain("<disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>"))
    assert spec.disks[0].empty
    assert spec.disks[0].source == SourceSpec("file")


def test_data_store_is_detected() -> None:
    # libvirt 9.0 drops <dataStore> when it defines a domain; newer libvirt (and hostile input) carry it.
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/i/d.qcow2'><dataStore type='file'><format type='raw'/>"
        "<source file='/i/d.raw'/></dataStore></source><target dev='vda'/></disk>"
    )
    assert parse_domain_xml(domain(disk)).disks[0].data_store


def test_data_store_hidden_in_the_backing_chain_is_detected() -> None:
    disk = (
        "<disk type='file'><driver type='qcow2'/><source file='/i/o.qcow2'/>"
        "<backingStore type='file'><format type='qcow2'/><source file='/i/b.qcow2'>"
        "<dataStore type='file'><source file='/i/b.raw'/></dataStore></source><backingStore/></backingStore>"
        "<target dev='vda'/></disk>"
    )
    assert parse_domain_xml(domain(disk)).disks[0].data_store


def test_network_backing_store_is_reported() -> None:
    disk = (
        "<disk type='file'><driver type='qcow2'/><source file='/i/o.qcow2'/>"
        "<backingStore type='network'><format type='raw'/><source protocol='nbd' name='exp'/>"
        "</backingStore><target dev='vda'/></disk>"
    )
    (backing,) = parse_domain_xml(domain(disk)).disks[0].backing_chain
    assert backing == BackingSpec(SourceSpec("network", protocol="nbd", name="exp"), "raw")


def test_endless_backing_chain_is_refused() -> None:
    chain = "<backingStore type='file'><source file='/i/b'/>" * 70 + "</backingStore>" * 70
    refused(domain(f"<disk type='file'><source file='/i/o'/>{chain}<target dev='vda'/></disk>"), "deeper than 64")


@pytest.mark.parametrize(
    ("disk", "match"),
    [
        ("<disk type='vhostvdpa'><source dev='/dev/x'/><target dev='vda'/></disk>", "unsupported source type"),
        ("<disk device='tape'><source file='/i/a'/><target dev='vda'/></disk>", "unsupported device 'tape'"),
        ("<disk><source file='/i/a'/></disk>", r"disk #0 lacks <target>"),
        ("<disk><source file='/i/a'/><target/></disk>", r"disk #0 has no <target dev>"),
        ("<disk><source file='a.img'/><target dev='vda'/></disk>", "'a.img' is not absolute"),
        ("<disk><source file='/i/a&#9;b'/><target dev='vda'/></disk>", "control character"),
        ("<disk><source file='/i/a'/><source file='/i/b'/><target dev='vda'/></disk>", "more than one <source>"),
        ("<disk><source file='/i/a'/><target dev='vda'/><target dev='vdb'/></disk>", "more than one <target>"),
        ("<disk><driver type='raw'/><driver type='qcow2'/><source file='/a'/><target dev='v'/></disk>", "driver"),
        ("<disk><driver type='qcow2 raw'/><source file='/a'/><target dev='v'/></disk>", "not a simple name"),
        ("<disk><source file='/a'/><target dev='../vda'/></disk>", "not a simple name"),
        ("<disk type='network'><source name='x'/><target dev='vda'/></disk>", "network source has no protocol"),
        (file_disk("vda") + file_disk("vda"), "two disks use target 'vda'"),
    ],
)
def test_bad_disk_is_refused(disk: str, match: str) -> None:
    refused(domain(disk), match)


def test_too_many_disks_are_refused() -> None:
    disks = "".join(file_disk(f"vd{i}") for i in range(domainxml.MAX_DISKS + 1))
    refused(domain(disks), "more than 1024 disks")


def test_second_devices_section_is_refused() -> None:
    refused(domain(file_disk(), extra=f"<devices>{file_disk('vdb', '/evil.qcow2')}</devices>"), "more than one")


def test_qemu_commandline_passthrough_is_reported() -> None:
    extra = (
        "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        "<qemu:arg value='-drive'/><qemu:arg value='file=/evil.qcow2'/></qemu:commandline>"
    )
    assert parse_domain_xml(domain(file_disk(), extra=extra)).qemu_passthrough == ("commandline",)


# --- os and features ----------------------------------------------------------------------------------------


def test_direct_kernel_boot_and_dtb() -> None:
    os = (
        "<type>hvm</type><kernel>/boot/k</kernel><initrd>/boot/i</initrd>"
        "<cmdline>  root=/dev/vda  </cmdline><dtb>/boot/d.dtb</dtb>"
    )
    spec = parse_domain_xml(domain(os=os))
    assert (spec.os.kernel, spec.os.initrd, spec.os.dtb) == ("/boot/k", "/boot/i", "/boot/d.dtb")
    assert spec.os.cmdline == "  root=/dev/vda  "  # passed to the guest verbatim


def test_no_os_boot_files() -> None:
    spec = parse_domain_xml(domain())
    assert spec.os == domainxml.OsSpec()


def test_nvram_in_source_form_and_firmware_autoselection() -> None:
    os = (
        "<type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
        "<nvram type='file' template='/usr/share/OVMF/OVMF_VARS.fd'><source file='/var/n.fd'/></nvram>"
    )
    spec = parse_domain_xml(domain(os=os))
    assert (spec.os.nvram, spec.os.nvram_template) == ("/var/n.fd", "/usr/share/OVMF/OVMF_VARS.fd")
    spec = parse_domain_xml(domain().replace(b"<os>", b"<os firmware='efi'>"))
    assert spec.os.firmware == "efi"


@pytest.mark.parametrize(
    ("os", "match"),
    [
        ("<kernel>vmlinuz</kernel>", "kernel path 'vmlinuz' is not absolute"),
        ("<kernel>/a</kernel><kernel>/b</kernel>", "more than one <kernel>"),
        ("<kernel><x/></kernel>", "must hold text only"),
        ("<nvram type='network'><source protocol='nbd'/></nvram>", "nvram type 'network' is not supported"),
        ("<cmdline>" + "x" * 70000 + "</cmdline>", "cmdline is longer than"),
    ],
)
def test_bad_os_is_refused(os: str, match: str) -> None:
    refused(domain(os=os), match)


@pytest.mark.parametrize(
    ("features", "expected"),
    [("", False), ("<vmcoreinfo state='on'/>", True), ("<vmcoreinfo/>", True), ("<vmcoreinfo state='off'/>", False)],
)
def test_vmcoreinfo(features: str, expected: bool) -> None:
    assert parse_domain_xml(domain(features=features)).vmcoreinfo is expected


def test_bad_vmcoreinfo_state_is_refused() -> None:
    refused(domain(features="<vmcoreinfo state='maybe'/>"), "vmcoreinfo state 'maybe'")


# --- hostguard metadata -------------------------------------------------------------------------------------


def test_metadata_absent() -> None:
    assert parse_domain_xml(domain(file_disk())).hostguard is None
    assert parse_domain_xml(domain(file_disk(), metadata="")).hostguard is None


def test_metadata_domain_wide() -> None:
    meta = f'<hostguard:image {HG} envelope="/srv/web.hgsig" name="web"/>'
    hg = parse_domain_xml(domain(file_disk(), metadata=meta)).hostguard
    assert hg is not None
    assert hg.refs == (EnvelopeRef("/srv/web.hgsig", name="web"),)
    assert hg.ref_for("vda") == EnvelopeRef("/srv/web.hgsig", name="web")


def test_metadata_per_disk_with_domain_wide_default() -> None:
    meta = (
        f'<hostguard:image {HG} envelope="/srv/os.hgsig">\n'
        '  <hostguard:disk target="vdb" envelope="/srv/data.hgsig" name="data"/>\n'
        "</hostguard:image>"
    )
    spec = parse_domain_xml(domain(file_disk("vda") + file_disk("vdb"), metadata=meta))
    assert spec.hostguard is not None
    assert spec.hostguard.domain_ref == EnvelopeRef("/srv/os.hgsig")
    assert spec.hostguard.ref_for("vdb") == EnvelopeRef("/srv/data.hgsig", name="data", target="vdb")
    assert spec.hostguard.ref_for("vda") == EnvelopeRef("/srv/os.hgsig")


def test_metadata_per_disk_only_leaves_other_disks_uncovered() -> None:
    meta = f'<hostguard:image {HG}><hostguard:disk target="vda" envelope="/srv/a.hgsig"/></hostguard:image>'
    spec = parse_domain_xml(domain(file_disk("vda") + file_disk("vdb"), metadata=meta))
    assert spec.hostguard is not None
    assert spec.hostguard.domain_ref is None
    assert spec.hostguard.ref_for("vdb") is None


def test_metadata_with_another_prefix_for_our_namespace() -> None:
    meta = f'<hg:image xmlns:hg="{HOSTGUARD_NS}" envelope="/srv/a.hgsig"/>'
    hg = parse_domain_xml(domain(metadata=meta)).hostguard
    assert hg is not None
    assert hg.refs == (EnvelopeRef("/srv/a.hgsig"),)


def test_metadata_foreign_namespace_is_ignored() -> None:
    meta = (
        '<hostguard:image xmlns:hostguard="https://evil.example/xmlns/domain/1" envelope="/evil.hgsig"/>'
        '<libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">'
        '<libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo>'
    )
    assert parse_domain_xml(domain(metadata=meta)).hostguard is None


def test_metadata_foreign_elements_beside_ours_are_ignored() -> None:
    meta = f'<x:y xmlns:x="urn:x"/><hostguard:image {HG} envelope="/srv/a.hgsig"/><z/>'
    hg = parse_domain_xml(domain(metadata=meta)).hostguard
    assert hg is not None
    assert hg.refs == (EnvelopeRef("/srv/a.hgsig"),)


def test_metadata_of_our_namespace_nested_in_a_foreign_element_does_not_count() -> None:
    meta = f'<x:y xmlns:x="urn:x"><hostguard:image {HG} envelope="/srv/a.hgsig"/></x:y>'
    assert parse_domain_xml(domain(metadata=meta)).hostguard is None


def test_metadata_duplicated_is_refused() -> None:
    meta = f'<hostguard:image {HG} envelope="/srv/a.hgsig"/><hostguard:image {HG} envelope="/srv/b.hgsig"/>'
    refused(domain(metadata=meta), "hostguard metadata appears more than once")


def test_metadata_section_duplicated_is_refused() -> None:
    meta = f'<hostguard:image {HG} envelope="/srv/a.hgsig"/></metadata><metadata>'
    refused(domain(metadata=meta), "more than one <metadata>")


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (f'<hostguard:verdict {HG} envelope="/a"/>', "hostguard metadata is <verdict>, not <image>"),
        (f"<hostguard:image {HG}/>", "names no envelope"),
        (f'<hostguard:image {HG} envelope="x.hgsig"/>', "'x.hgsig' is not absolute"),
        (f'<hostguard:image {HG} envelope=""/>', "lacks envelope"),
        (f'<hostguard:image {HG} envelope="/a" key="/k.pem"/>', "unexpected attribute 'key'"),
        (f'<hostguard:image {HG} xmlns:o="urn:o" envelope="/a" o:x="1"/>', r"unexpected attribute '\{urn:o\}x'"),
        (f'<hostguard:image {HG} envelope="/a">text</hostguard:image>', "must not contain text"),
        (f'<hostguard:image {HG} envelope="/a" name=""/>', "name must be 1..256"),
        (f'<hostguard:image {HG} envelope="/a"><disk target="vda" envelope="/b"/></hostguard:image>', "unexpected"),
        (
            f'<hostguard:image {HG}><hostguard:disk target="vdz" envelope="/b"/></hostguard:image>',
            "target 'vdz' is not a disk of this domain",
        ),
        (
            f'<hostguard:image {HG}><hostguard:disk target="vda" envelope="/b"/>'
            '<hostguard:disk target="vda" envelope="/c"/></hostguard:image>',
            "target 'vda' appears twice",
        ),
        (f'<hostguard:image {HG}><hostguard:disk envelope="/b"/></hostguard:image>', "lacks target"),
        (f'<hostguard:image {HG}><hostguard:disk target="vda"/></hostguard:image>', "vda lacks envelope"),
        (
            f'<hostguard:image {HG}><hostguard:disk target="vda" envelope="/b"><x/></hostguard:disk></hostguard:image>',
            "must be empty",
        ),
    ],
)
def test_bad_metadata_is_refused(meta: str, match: str) -> None:
    refused(domain(file_disk("vda"), metadata=meta), match)


# --- robustness ---------------------------------------------------------------------------------------------

SEED = (DATA / "libvirt9_live_overlay.xml").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_domain_xml_only_ever_raises_domain_error(data: st.DataObject) -> None:
    raw = bytearray(SEED)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "delete", "insert"]))
        if op == "set":
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del raw[pos]
        else:
            raw[pos:pos] = data.draw(st.sampled_from([b"<", b">", b"&", b"<!DOCTYPE x>", b"<?x?>", b"'", b"\x00"]))
    try:
        parse_domain_xml(bytes(raw))
    except DomainError as err:
        assert "\n" not in str(err)


def test_import_does_not_load_lxml() -> None:
    code = "import sys, hostguard.domain.xmlparse; print('lxml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
