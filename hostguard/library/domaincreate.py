"""`hostguard domain create`: define a domain on a library image the way an admin would by hand.

A fresh qcow2 overlay on the library image with an explicit backing format, vmcoreinfo on, hostguard
metadata naming the library source's envelope, a serial console, and nothing else unusual.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from hostguard.domain.xmlparse import HOSTGUARD_NS
from hostguard.errors import UsageError
from hostguard.host import libvirt
from hostguard.library.pool import NAME_RE, Source

DEFAULT_CMDLINE = "console=ttyS0 root=/dev/vda"


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        import fcntl

        return fcntl.ioctl(fd, 0xAE00) >= 0  # KVM_GET_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def domain_xml(
    name: str,
    src: Source,
    overlay: Path,
    *,
    memory_mib: int,
    vcpus: int,
    kernel_boot: bool,
    cmdline: str,
    virt_type: str,
    image_name: str,
    network: str | None,
) -> str:
    boot = "<boot dev='hd'/>"
    if kernel_boot:
        if src.kernel is None or src.initrd is None:
            raise UsageError(f"library image {src.name!r} has no kernel and initrd: add it with --kernel/--initrd")
        boot = (
            f"<kernel>{escape(str(src.kernel))}</kernel><initrd>{escape(str(src.initrd))}</initrd>"
            f"<cmdline>{escape(cmdline)}</cmdline>"
        )
    nic = (
        f"<interface type='network'><source network={quoteattr(network)}/><model type='virtio'/></interface>"
        if network
        else ""
    )
    return f"""<domain type={quoteattr(virt_type)}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <metadata>
    <hostguard:image xmlns:hostguard="{HOSTGUARD_NS}"
        envelope={quoteattr(str(src.envelope))} name={quoteattr(image_name)}/>
  </metadata>
  <os><type arch='x86_64'>hvm</type>{boot}</os>
  <features><acpi/><vmcoreinfo state='on'/></features>
  <clock offset='utc'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(overlay))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {nic}
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
"""


def create_domain(
    conn: object,
    name: str,
    src: Source,
    *,
    image_name: str,
    images_dir: Path,
    memory_mib: int,
    vcpus: int,
    kernel_boot: bool,
    cmdline: str,
    network: str | None,
) -> Path:
    """Make the overlay and define the domain; returns the overlay path."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"domain name {name!r} must be letters, digits and ._+-")
    overlay = images_dir / f"{name}.qcow2"
    if overlay.exists():
        raise UsageError(f"{overlay} exists already")
    images_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", src.format, "-b", str(src.image), str(overlay)],
        check=True,
        capture_output=True,
    )
    overlay.chmod(0o600)
    xml = domain_xml(
        name,
        src,
        overlay,
        memory_mib=memory_mib,
        vcpus=vcpus,
        kernel_boot=kernel_boot,
        cmdline=cmdline,
        virt_type="kvm" if kvm_usable() else "qemu",
        image_name=image_name,
        network=network,
    )
    try:
        conn.defineXML(xml)  # type: ignore[attr-defined]
    except libvirt.libvirtError as exc:
        overlay.unlink(missing_ok=True)
        raise UsageError(f"libvirt refused the definition: {exc.get_error_message()}") from None
    return overlay
