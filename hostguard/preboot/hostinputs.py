"""Host content a domain hands to its guest besides its disks, and the policy for each kind.

A signed manifest covers the disks and the boot files. A domain definition can also make the guest run or
read other host files: a shared directory (virtiofs, 9p), a passed-through or redirected device, ACPI tables
(AML the guest kernel executes), option ROMs and firmware (code the guest's firmware executes), fw_cfg blobs
(read by firmware and by provisioning tools such as Ignition), file-backed memory devices (nvdimm,
virtio-pmem: storage the guest can boot from). None of these is verified, so each is refused unless the
policy says otherwise. Firmware, nvram templates and option ROMs are allowed from the distribution's firmware
directories (`[policy] firmware_dirs`), which only the package manager writes. Each refusal is one line
naming the element and the policy key that would allow it.

Inputs that change what runs before the signed code does (ADR 0008): the QEMU binary (`<emulator>`, from
`[policy] emulators`), the kernel command line for a signed kernel (`check_cmdline`, after the kernel's
manifest verified: the line or parameters it signs, else `[policy] allow_cmdline_params`), SMBIOS
OEM strings and fw_cfg entries that systemd reads as credentials or extra kernel parameters (refused), network
boot ahead of the disk (refused), a UEFI variable store outside libvirt's nvram directory (`[policy]
nvram_dirs`), a writable shared firmware file (refused), `<shmem>` (`[policy] allow_shmem`). Paths are judged
as libvirt opens them: lexically inside an allowed directory *and* resolved inside one, so a symlink placed
elsewhere cannot be re-aimed after the check.
"""

from __future__ import annotations

import os

from hostguard.domain.paths import glob_match, name_match, under_dir
from hostguard.errors import DomainError
from hostguard.owner.hookrule import is_bootchannel_fwcfg

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Sequence

    from hostguard.domain.spec import DomainSpec
    from hostguard.host.config import Config


# SMBIOS type 11 / fw_cfg names systemd (and systemd-stub/-boot) read as credentials or kernel parameters.
SYSTEMD_OEM_PREFIX = "io.systemd."
SYSTEMD_FWCFG_PREFIX = "opt/io.systemd."


def under_firmware_dir(path: str, dirs: Sequence[str]) -> bool:
    """Whether `path` (firmware, a ROM, an nvram store) lies inside one of `dirs` both as written (libvirt
    opens the path as given, so a symlink elsewhere that points in could be re-aimed later) and with symlinks
    resolved (a link inside that points out is refused too)."""
    if not any(under_dir(path, d) for d in dirs):
        return False
    real = os.path.realpath(path)
    for directory in dirs:
        base = os.path.realpath(directory).rstrip("/")
        if real.startswith(base + "/"):
            return True
    return False


def cmdline_refusal(cmdline: str, allowed: Sequence[str], source: str = "[policy] allow_cmdline_params") -> str | None:
    """Why the host-chosen kernel command line is not allowed, or None. Parameters are split on spaces only
    and must each match one of `allowed` (fnmatch globs over the whole parameter). Anything the kernel might
    split or unquote differently from this check (quotes, tabs, newlines, non-ASCII: the kernel treats the
    byte 0xA0 as a space) is refused outright."""
    if any(not (" " <= c <= "~") for c in cmdline) or '"' in cmdline:
        return "contains quotes, tabs, newlines or non-ASCII characters"
    for param in cmdline.split(" "):
        if param and not any(name_match(param, g) for g in allowed):
            return f"parameter {param[:80]!r} is not signed and not in {source}"
    return None


def check_host_inputs(spec: DomainSpec, config: Config) -> None:
    """Raise DomainError for the first host input the policy does not allow."""
    if spec.emulator is not None and not any(glob_match(spec.emulator, g) for g in config.emulators):
        raise DomainError(
            f"emulator {spec.emulator} is not a known QEMU binary of this host: a wrapper could add any argument "
            "(see [policy] emulators)"
        )
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
    if spec.shmem and not config.allow_shmem:
        raise DomainError(
            f"shared memory device {spec.shmem[0]!r} maps host memory into the guest (set [policy] allow_shmem = true)"
        )
    _check_firmware(spec, config)
    _check_boot_sources(spec, config)
    dirs = config.firmware_dirs
    for item in spec.host_files:
        if item.kind == "rom" and item.path is not None and not under_firmware_dir(item.path, dirs):
            raise DomainError(
                f"option ROM {item.path} of {item.owner} is not in a firmware directory ({', '.join(dirs)}); "
                "see [policy] firmware_dirs"
            )
        if item.kind == "fwcfg" and item.owner.startswith(SYSTEMD_FWCFG_PREFIX):
            raise DomainError(
                f"fw_cfg entry {item.owner} hands systemd credentials or kernel parameters to the guest; "
                "no policy key allows that"
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


def _check_firmware(spec: DomainSpec, config: Config) -> None:
    dirs = config.firmware_dirs
    os_spec = spec.os
    for label, path in (("firmware", os_spec.loader), ("nvram template", os_spec.nvram_template)):
        if path is not None and not under_firmware_dir(path, dirs):
            raise DomainError(
                f"{label} {path} is not in a firmware directory ({', '.join(dirs)}); see [policy] firmware_dirs"
            )
    if os_spec.loader is not None and os_spec.loader_type == "pflash" and not os_spec.loader_readonly:
        # libvirt opens a pflash loader writable unless readonly='yes': the guest could rewrite shared firmware.
        raise DomainError(
            f"firmware {os_spec.loader} would be opened writable (pflash without readonly='yes'): "
            "a guest could rewrite firmware other domains boot"
        )
    if os_spec.nvram is not None:
        nvram = os_spec.nvram
        if not under_firmware_dir(nvram, config.nvram_dirs) or os.path.islink(nvram):
            raise DomainError(
                f"UEFI variable store {nvram} is not a file in libvirt's nvram directory "
                f"({', '.join(config.nvram_dirs)}): it holds Secure Boot keys and the boot order "
                "(see [policy] nvram_dirs)"
            )


def _check_boot_sources(spec: DomainSpec, config: Config) -> None:
    """Network boot ahead of the disk, host-chosen kernel parameters, systemd's SMBIOS credentials."""
    devs = spec.os.boot_devs
    if "network" in devs and ("hd" not in devs or devs.index("network") < devs.index("hd")):
        raise DomainError(
            "network boot (<boot dev='network'/>) comes before the signed disk: list <boot dev='hd'/> first"
        )
    disks = [e.order for e in spec.boot_order if e.kind == "disk"]
    for entry in sorted(spec.boot_order, key=lambda e: e.order):
        if entry.kind in ("network", "hostdev", "redirdev") and (not disks or entry.order < min(disks)):
            raise DomainError(
                f"{entry.owner} boots (order {entry.order}) before any signed disk: give a disk the lowest boot order"
            )
    for text in spec.oem_strings:
        if SYSTEMD_OEM_PREFIX in text:
            raise DomainError(
                f"SMBIOS OEM string {text[:60]!r} hands systemd credentials or kernel parameters to the guest; "
                "no policy key allows that"
            )


def check_cmdline(spec: DomainSpec, signed_boot: object, label: str, config: Config) -> None:
    """The host's `<cmdline>` for a signed kernel, after the kernel's manifest verified (`signed_boot`: its
    `boot` entry as JSON). A signed exact line must be equal (no `<cmdline>` is the empty line); signed
    parameters replace `[policy] allow_cmdline_params` for this image; without either, the policy decides."""
    if spec.os.kernel is None:
        return
    host = spec.os.cmdline or ""
    boot = signed_boot if isinstance(signed_boot, dict) else {}
    if "cmdline" in boot:
        signed = boot["cmdline"]
        if not isinstance(signed, str) or host != signed:
            raise DomainError(
                f"kernel command line {host[:200]!r} is not the one {label} signs ({str(signed)[:200]!r}): "
                "the manifest names the exact line"
            )
        return
    params = boot.get("cmdline_params")
    if params is not None:
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise DomainError(f"{label}: the signed boot.cmdline_params are malformed")
        why = cmdline_refusal(host, params, f"the parameters {label} signs (boot.cmdline_params)")
    else:
        why = cmdline_refusal(host, config.allow_cmdline_params) if host else None
    if why is not None:
        raise DomainError(f"kernel command line {why}")
