"""The host's side of the boot channel: edit a domain's persistent definition, keep K root-only, shred it.

`hostguard bootchannel attach` adds to the persistent definition (effective at the next start):

* ``<sysinfo type='smbios'><oemStrings><entry>hgowner1:...</entry>`` and ``<os><smbios mode='sysinfo'/>``
  (the guest reads it from /sys/firmware/dmi/entries/11-*/raw);
* shared-secret only: ``<sysinfo type='fwcfg'><entry name='opt/org.hostguard/owner-k' file='RUN/UUID.k'/>``.
  The XML names the file, never its content. The file is created root:root 0600 in the run directory (tmpfs:
  K never reaches a disk); libvirt's DAC driver hands it to the QEMU user for the run and gives it back after;
* two virtio-serial channels ``<channel type='unix'>`` bound to RUN/UUID.boot.sock (target
  ``org.hostguard.boot.0``, the return direction) and RUN/UUID.owner.sock (``org.hostguard.owner.0``, the owner
  session transport; `relay` exposes it on TCP);
* ``<hgbc:bootchannel>`` in ``<metadata>`` (namespace `NS`): protocol, owner key, state - nothing secret.

The record of each attachment lives in STATE/bootchannel/UUID.json (0600): protocol, owner key hash, a
128-bit commitment to K (`Secret.check`), the guest's last announcement. Never K.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostguard import strictjson
from hostguard.errors import ConfigError, DomainError, FormatError, UsageError
from hostguard.host import libvirt
from hostguard.host.fsutil import atomic_write
from hostguard.host.libvirt import lookup
from hostguard.owner import names
from hostguard.owner.names import BOOT_PORT, FWCFG_NAME, OEM_PREFIX, OWNER_PORT
from hostguard.owner.tokens import BootToken, Secret
from hostguard.record import Record

if TYPE_CHECKING:
    from lxml import etree

NS = "https://hostguard.dev/xmlns/bootchannel/1"
PREFIX = "hgbc"
DEFAULT_RUN_DIR = Path(names.DEFAULT_RUN_DIR)
DEFAULT_STATE_DIR = Path("/var/lib/hostguard/state")
OUR_PORTS = (BOOT_PORT, OWNER_PORT)
MAX_XML = 4 * 1024 * 1024


class Paths(Record):
    run_dir: Path = DEFAULT_RUN_DIR  # K files and channel sockets (tmpfs)
    state_dir: Path = DEFAULT_STATE_DIR  # records (hostguard's state directory)

    def key_file(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}.k"

    def boot_socket(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}.boot.sock"

    def owner_socket(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}.owner.sock"

    def record(self, uuid: str) -> Path:
        return self.state_dir / "bootchannel" / f"{uuid}.json"


# --- XML transforms (pure) -------------------------------------------------------------------------------------


def parse_xml(data: bytes) -> etree._Element:
    from lxml import etree

    if len(data) > MAX_XML or b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise DomainError("domain XML is too large or has a DOCTYPE")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise DomainError(f"domain XML does not parse: {str(exc)[:120]}") from None
    if root.tag != "domain":
        raise DomainError("domain XML root is not <domain>")
    return root


def _serialize(root: etree._Element) -> bytes:
    from lxml import etree

    return bytes(etree.tostring(root, encoding="utf-8"))


def remove_bootchannel(data: bytes) -> bytes:
    """The definition without any of hostguard's boot-channel elements (idempotent)."""
    return _serialize(_remove(parse_xml(data)))


def _remove(root: etree._Element) -> etree._Element:
    meta = _our_metadata(root)
    added_smbios = meta is not None and meta.get("smbios-added") == "yes"
    for sysinfo in root.findall("sysinfo"):
        kind = sysinfo.get("type")
        if kind == "smbios":
            for oem in sysinfo.findall("oemStrings"):
                for entry in oem.findall("entry"):
                    if (entry.text or "").startswith(OEM_PREFIX):
                        oem.remove(entry)
                if len(oem) == 0:
                    sysinfo.remove(oem)
        elif kind == "fwcfg":
            for entry in sysinfo.findall("entry"):
                if entry.get("name") == FWCFG_NAME:
                    sysinfo.remove(entry)
        if len(sysinfo) == 0:
            root.remove(sysinfo)
    if added_smbios and not any(s.get("type") == "smbios" for s in root.findall("sysinfo")):
        os_elem = root.find("os")
        if os_elem is not None:
            for smbios in os_elem.findall("smbios"):
                if smbios.get("mode") == "sysinfo":
                    os_elem.remove(smbios)
    devices = root.find("devices")
    if devices is not None:
        for channel in devices.findall("channel"):
            target = channel.find("target")
            if target is not None and target.get("name") in OUR_PORTS:
                devices.remove(channel)
    if meta is not None:
        parent = meta.getparent()
        if parent is not None:
            parent.remove(meta)
    return root


def _our_metadata(root: etree._Element) -> etree._Element | None:
    metadata = root.find("metadata")
    return None if metadata is None else metadata.find(f"{{{NS}}}bootchannel")


def add_bootchannel(
    data: bytes,
    token: BootToken,
    *,
    key_file: Path | None,
    boot_socket: Path,
    owner_socket: Path,
) -> bytes:
    """Replace any earlier attachment with this one (see the module docstring for what is added)."""
    from lxml import etree

    root = _remove(parse_xml(data))
    os_elem = root.find("os")
    if os_elem is None:
        raise DomainError("domain has no <os> element")
    smbios = os_elem.findall("smbios")
    if len(smbios) > 1 or (smbios and smbios[0].get("mode") != "sysinfo"):
        mode = smbios[0].get("mode")
        raise UsageError(f"domain uses <smbios mode='{mode}'>: the boot token needs mode='sysinfo' (change it first)")
    added_smbios = not smbios
    if added_smbios:
        etree.SubElement(os_elem, "smbios", mode="sysinfo")
    index = list(root).index(os_elem)
    sysinfo = next((s for s in root.findall("sysinfo") if s.get("type") == "smbios"), None)
    if sysinfo is None:
        sysinfo = etree.Element("sysinfo", type="smbios")
        root.insert(index, sysinfo)
        index += 1
    oem = sysinfo.find("oemStrings")
    if oem is None:
        oem = etree.SubElement(sysinfo, "oemStrings")
    etree.SubElement(oem, "entry").text = token.encode()
    if token.protocol == "shared-secret":
        if key_file is None:
            raise UsageError("shared-secret needs a key file")
        fwcfg = next((s for s in root.findall("sysinfo") if s.get("type") == "fwcfg"), None)
        if fwcfg is None:
            fwcfg = etree.Element("sysinfo", type="fwcfg")
            root.insert(index, fwcfg)
        etree.SubElement(fwcfg, "entry", name=FWCFG_NAME, file=str(key_file))
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    for port, path in ((BOOT_PORT, boot_socket), (OWNER_PORT, owner_socket)):
        channel = etree.SubElement(devices, "channel", type="unix")
        etree.SubElement(channel, "source", mode="bind", path=str(path))
        etree.SubElement(channel, "target", type="virtio", name=port)
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        root.insert(list(root).index(os_elem), metadata)
    meta = etree.SubElement(metadata, f"{{{NS}}}bootchannel", nsmap={PREFIX: NS})
    meta.set("protocol", token.protocol)
    if token.owner_key:
        meta.set("owner-key", token.owner_key)
    meta.set("state", "attached")
    if added_smbios:
        meta.set("smbios-added", "yes")
    return _serialize(root)


def remove_secret_entry(data: bytes) -> bytes:
    """The definition without the K fw_cfg entry (after the guest read K): next starts need no K file."""
    root = parse_xml(data)
    for sysinfo in root.findall("sysinfo"):
        if sysinfo.get("type") == "fwcfg":
            for entry in sysinfo.findall("entry"):
                if entry.get("name") == FWCFG_NAME:
                    sysinfo.remove(entry)
            if len(sysinfo) == 0:
                root.remove(sysinfo)
    return _serialize(root)


def channel_socket(data: bytes, port: str) -> Path | None:
    """The host socket of the unix channel with target name `port` (from a live or inactive definition)."""
    root = parse_xml(data)
    devices = root.find("devices")
    for channel in [] if devices is None else devices.findall("channel"):
        target, source = channel.find("target"), channel.find("source")
        if channel.get("type") == "unix" and target is not None and target.get("name") == port:
            path = None if source is None else source.get("path")
            return Path(path) if path else None
    return None


def metadata_xml(record: dict[str, Any]) -> str:
    """The <hgbc:bootchannel> element for virDomainSetMetadata (no namespace declaration: libvirt adds it)."""
    from xml.sax.saxutils import quoteattr

    ann = record.get("announcement") or {}
    attrs = {
        "protocol": record.get("protocol"),
        "owner-key": record.get("owner_key") or ann.get("owner_key"),
        "vm-key": ann.get("vm_key"),
        "state": ann.get("state") or "attached",
        "k": record.get("k_status"),
        "updated": record.get("updated"),
        "smbios-added": "yes" if record.get("smbios_added") else None,
    }
    return "<bootchannel " + " ".join(f"{k}={quoteattr(str(v))}" for k, v in attrs.items() if v) + "/>"


# --- files --------------------------------------------------------------------------------------------------------


def ensure_run_dir(run_dir: Path) -> None:
    """root-owned, 0711: the QEMU user can reach a file it was given, nobody can list them."""
    run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    st = os.lstat(run_dir)
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{run_dir} is not owned by the user running hostguard")
    os.chmod(run_dir, 0o711)  # noqa: S103 - search only, no listing: QEMU must reach its K file


def write_key_file(path: Path, secret: Secret) -> None:
    """Create the fw_cfg blob: root-only (0600), exclusive create, no symlink following."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret.encode().removesuffix(b"\n"))
        os.fsync(fd)
    finally:
        os.close(fd)


def shred(path: Path) -> bool:
    """Overwrite the file with random bytes, sync, unlink. False when it did not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.write(fd, os.urandom(max(os.fstat(fd).st_size, 1)))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    return True


def save_record(paths: Paths, uuid: str, record: dict[str, Any]) -> None:

    directory = paths.record(uuid).parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {**record, "updated": utc_now()}
    atomic_write(paths.record(uuid), json.dumps(record, indent=1, sort_keys=True).encode(), mode=0o600)


def load_record(paths: Paths, uuid: str) -> dict[str, Any] | None:

    try:
        data = paths.record(uuid).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {paths.record(uuid)}: {exc.strerror}") from None
    doc = strictjson.loads(data, what=str(paths.record(uuid)), max_size=64 * 1024)
    if not isinstance(doc, dict):
        raise FormatError(f"{paths.record(uuid)} is not a JSON object")
    return doc


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- libvirt operations -------------------------------------------------------------------------------------------


class Attached(Record):
    domain: str
    uuid: str
    protocol: str
    secret: Secret | None  # hand to the owner once, then drop
    record: dict[str, Any]
    running: bool


def attach(
    conn: libvirt.Connection, domain: str, protocol: str, paths: Paths, *, owner_key: str | None = None
) -> Attached:
    """Write the boot channel into `domain`'s persistent definition; for shared-secret, create K."""

    if protocol not in ("shared-secret", "no-secrets"):
        raise UsageError(f"unknown protocol {protocol!r}")
    if (protocol == "no-secrets") != (owner_key is not None):
        raise UsageError("--owner-key-hash is required for no-secrets and not used by shared-secret")
    dom = lookup(conn, domain)
    if not dom.isPersistent():
        raise UsageError(f"{dom.name()} is transient: the boot channel lives in the persistent definition")
    uuid = dom.UUIDString()
    token = BootToken(protocol, owner_key)
    token.encode()  # validates the owner key hash
    ensure_run_dir(paths.run_dir)
    secret = Secret.generate() if protocol == "shared-secret" else None
    key_file = paths.key_file(uuid) if secret is not None else None
    xml = _inactive_xml(dom)
    new_xml = add_bootchannel(
        xml, token, key_file=key_file, boot_socket=paths.boot_socket(uuid), owner_socket=paths.owner_socket(uuid)
    )
    shred(paths.key_file(uuid))  # an earlier attachment's K
    if key_file is not None and secret is not None:
        write_key_file(key_file, secret)
    _define(conn, new_xml, cleanup=key_file)
    ours = _our_metadata(parse_xml(new_xml))
    record = {
        "v": 1,
        "domain": dom.name(),
        "uuid": uuid,
        "protocol": protocol,
        "owner_key": owner_key,
        "k_check": secret.check() if secret is not None else None,
        "k_status": "pending" if secret is not None else "none",
        "attached_at": utc_now(),
        "smbios_added": ours is not None and ours.get("smbios-added") == "yes",
        "announcement": None,
        "announced_at": None,
    }
    save_record(paths, uuid, record)
    return Attached(dom.name(), uuid, protocol, secret, record, bool(dom.isActive()))


def detach(conn: libvirt.Connection, domain: str, paths: Paths) -> bool:
    """Remove the boot channel from the persistent definition, shred K, drop the record. True if K existed."""

    dom = lookup(conn, domain)
    uuid = dom.UUIDString()
    _define(conn, remove_bootchannel(_inactive_xml(dom)))
    shredded = shred(paths.key_file(uuid))
    paths.record(uuid).unlink(missing_ok=True)
    return shredded


def drop_secret(conn: libvirt.Connection, dom: libvirt.Domain, paths: Paths) -> bool:
    """The guest has read K: shred the host file and take the fw_cfg entry out of the next start."""
    uuid = dom.UUIDString()
    if dom.isPersistent():
        _define(conn, remove_secret_entry(_inactive_xml(dom)))
    return shred(paths.key_file(uuid))


def forget_undefined(conn: libvirt.Connection, paths: Paths) -> list[str]:
    """Shred K files and records of domains that no longer exist (run after an undefine). Returns UUIDs."""
    gone: list[str] = []
    if not paths.run_dir.is_dir():
        return gone
    for key_file in paths.run_dir.glob("*.k"):
        uuid = key_file.name[: -len(".k")]
        try:
            conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            shred(key_file)
            paths.record(uuid).unlink(missing_ok=True)
            gone.append(uuid)
    return gone


def _inactive_xml(dom: libvirt.Domain) -> bytes:
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).encode()


def _define(conn: libvirt.Connection, xml: bytes, cleanup: Path | None = None) -> None:
    try:
        conn.defineXML(xml.decode())
    except libvirt.libvirtError as exc:
        if cleanup is not None:
            shred(cleanup)
        raise DomainError(f"libvirt refused the boot channel definition: {exc.get_error_message()}") from None


def set_metadata(dom: libvirt.Domain, record: dict[str, Any]) -> None:
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata_xml(record), PREFIX, NS, flags)
