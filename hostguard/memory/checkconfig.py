"""`hostguard domain check-config DOMAIN [--fix]`: is a domain set up for memory introspection?

Needed: `<features><vmcoreinfo state='on'/></features>` (QEMU's vmcoreinfo device, through which the guest
kernel publishes VMCOREINFO so that it lands in memory dumps). Without it hostguard falls back to scanning
the dump for the kernel's in-memory copy, which works for stock kernels but is a weaker source.
`--fix` adds the feature to the persistent (inactive) definition with `defineXML`; a running domain picks it
up at its next cold boot. The domain XML is validated by `hostguard.domain.xmlparse` before it is edited.
"""

from __future__ import annotations

from hostguard.domain.xmlparse import parse_domain_xml
from hostguard.errors import ConfigError, DomainError
from hostguard.host import libvirt
from hostguard.record import Record


class ConfigCheck(Record):
    domain: str
    vmcoreinfo: bool  # in the persistent definition (after a fix: the new state)
    live_vmcoreinfo: bool | None  # in the running domain; None when it is not running
    problems: tuple[str, ...]  # what is missing, one line each
    fixed: bool = False
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"{self.domain}: {'ok' if self.ok else 'not ready for memory introspection'}"]
        out += [f"  missing: {p}" for p in self.problems]
        out += [f"  {n}" for n in self.notes]
        return out


def _xml(dom: libvirt.Domain, flags: int) -> bytes:
    return str(dom.XMLDesc(flags)).encode("utf-8")


def check_config(conn: libvirt.Connection, name: str, *, fix: bool = False) -> ConfigCheck:
    """Check (and with `fix`, repair) domain `name` on the libvirt connection `conn`."""
    try:
        dom = conn.lookupByName(name)
        persistent = bool(dom.isPersistent())
        active = bool(dom.isActive())
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        inactive_xml = _xml(dom, flags) if persistent else None
        live_xml = _xml(dom, 0) if active else None
    except libvirt.libvirtError as err:
        raise ConfigError(f"domain {name}: {err.get_error_message()}") from None
    live = parse_domain_xml(live_xml).vmcoreinfo if live_xml is not None else None
    if inactive_xml is None:
        problems = () if live else ("<features><vmcoreinfo state='on'/></features> (transient domain: cannot fix)",)
        return ConfigCheck(name, bool(live), live, problems)
    spec = parse_domain_xml(inactive_xml)
    notes: list[str] = []
    if spec.vmcoreinfo:
        if live is False:
            notes.append("the persistent definition has vmcoreinfo; the running instance does not until a cold boot")
        return ConfigCheck(name, True, live, (), notes=tuple(notes))
    problem = "<features><vmcoreinfo state='on'/></features>"
    if not fix:
        notes.append("run with --fix to add it to the persistent definition")
        return ConfigCheck(name, False, live, (problem,), notes=tuple(notes))
    new_xml = add_vmcoreinfo(inactive_xml)
    if not parse_domain_xml(new_xml).vmcoreinfo:
        raise DomainError("adding vmcoreinfo to the domain XML did not take effect")
    try:
        conn.defineXML(new_xml.decode("utf-8"))
    except libvirt.libvirtError as err:
        raise ConfigError(f"domain {name}: defineXML refused the fixed definition: {err.get_error_message()}") from None
    if active:
        notes.append("added to the persistent definition; takes effect at the next cold boot (shut down, start)")
    else:
        notes.append("added to the persistent definition")
    return ConfigCheck(name, True, live, (), fixed=True, notes=tuple(notes))


def add_vmcoreinfo(xml: bytes) -> bytes:
    """`xml` (already validated by parse_domain_xml) with `<vmcoreinfo state='on'/>` in `<features>`."""
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    root = etree.fromstring(xml, parser)
    features = root.find("features")
    if features is None:
        features = etree.Element("features")
        # libvirt's schema puts <features> after <os>/<cpu>-ish elements; it reorders on define anyway
        os_elem = root.find("os")
        if os_elem is not None:
            os_elem.addnext(features)
        else:
            root.append(features)
    elem = features.find("vmcoreinfo")
    if elem is None:
        elem = etree.SubElement(features, "vmcoreinfo")
    elem.set("state", "on")
    return bytes(etree.tostring(root, encoding="utf-8"))
