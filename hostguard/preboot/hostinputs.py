"""Host content a domain hands to its guest besides its disks, and the policy for each kind.

A signed manifest covers the disks and the boot files. A domain definition can also make the guest run or
read other host files: a shared directory (virtiofs, 9p), a passed-through or redirected device, ACPI tables
(AML the guest kernel executes), option ROMs and firmware (code the guest's firmware executes), fw_cfg blobs
(read by firmware and by provisioning tools such as Ignition), file-backed memory devices (nvdimm,
virtio-pmem: storage the guest can boot from). None of these is verified, so each is refused unless the
policy says otherwise. Firmware, nvram templates and option ROMs are allowed from the distribution's firmware
directories (`[policy] firmware_dirs`), which only the package manager writes. Each refusal is one line
naming the element and the policy key that would allow it.
"""

from __future__ import annotations

import os

from hostguard.errors import DomainError
from hostguard.owner.hookrule import is_bootchannel_fwcfg

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Sequence

    from hostguard.domain.spec import DomainSpec
    from hostguard.host.config import Config


def under_firmware_dir(path: str, dirs: Sequence[str]) -> bool:
    """Whether `path`, with symlinks resolved, lies inside one of `dirs` (symlinks resolved too)."""
    real = os.path.realpath(path)
    for directory in dirs:
        base = os.path.realpath(directory).rstrip("/")
        if real.startswith(base + "/"):
            return True
    return False


def check_host_inputs(spec: DomainSpec, config: Config) -> None:
    """Raise DomainError for the first host input the policy does not allow."""
    if spec.qemu_passthrough:
        raise DomainError("QEMU command-line passthrough (<qemu:commandline>) could add unverified devices")
    if spec.os.dtb:
        raise DomainError("a device tree (<dtb>) is not covered by the manifest")
    if spec.filesystems and not config.allow_filesystems:
        fs = spec.filesystems[0]
        raise DomainError(
            f"filesystem share {fs.source or '(no source)'} -> {fs.target or '(no target)'} ({fs.driver or fs.type}): "
            "host files shared into the guest are not covered by the manifest "
            "(set [policy] allow_filesystems = true to allow shares)"
        )
    if spec.hostdevs and not config.allow_hostdev:
        dev = spec.hostdevs[0]
        what = "USB redirection" if dev.element == "redirdev" else "host device passthrough"
        raise DomainError(
            f"{what} ({dev.type or 'unknown type'}) is not allowed by policy (set [policy] allow_hostdev = true)"
        )
    if spec.os.acpi_tables and not config.allow_acpi_tables:
        table = spec.os.acpi_tables[0]
        raise DomainError(
            f"ACPI table {table.path or '(no file)'} ({table.type}) would run host-supplied AML in the guest "
            "(set [policy] allow_acpi_tables = true)"
        )
    dirs = config.firmware_dirs
    for label, path in (("firmware", spec.os.loader), ("nvram template", spec.os.nvram_template)):
        if path is not None and not under_firmware_dir(path, dirs):
            raise DomainError(
                f"{label} {path} is not in a firmware directory ({', '.join(dirs)}); see [policy] firmware_dirs"
            )
    for item in spec.host_files:
        if item.kind == "rom" and item.path is not None and not under_firmware_dir(item.path, dirs):
            raise DomainError(
                f"option ROM {item.path} of {item.owner} is not in a firmware directory ({', '.join(dirs)}); "
                "see [policy] firmware_dirs"
            )
        if item.kind == "fwcfg" and not config.allow_fwcfg and not is_bootchannel_fwcfg(item.owner, item.path):
            source = f"file {item.path}" if item.path else "inline data"
            raise DomainError(
                f"fw_cfg entry {item.owner} ({source}) hands host data to the guest (set [policy] allow_fwcfg = true)"
            )
        if item.kind == "memory":
            raise DomainError(
                f"{item.owner} memory device is backed by host file {item.path}: guest-visible storage that no "
                "manifest covers"
            )
