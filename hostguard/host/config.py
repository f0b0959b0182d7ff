"""Host configuration: /etc/hostguard/hostguard.toml, or the file named by HOSTGUARD_CONFIG.

A missing or broken configuration is a ConfigError, which the hook turns into a deny for every domain in
scope: it never means "skip checks". Unknown keys are errors so that a typo cannot silently weaken policy.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from hostguard.errors import ConfigError
from hostguard.host.securepath import check_secure

TYPE_CHECKING = False  # typing costs ~3 ms to import; mypy treats this name like typing.TYPE_CHECKING
if TYPE_CHECKING:
    from typing import Any

    from hostguard.signed.findings import FindingPolicy

DEFAULT_PATH = Path("/etc/hostguard/hostguard.toml")
DEFAULT_AUDIT_LOG = "/var/log/hostguard/audit.jsonl"
MODES = ("enforce", "audit")
ACTIONS = ("pause", "destroy", "log")
# Where distributions install guest firmware (OVMF/AAVMF/edk2, SeaBIOS, iPXE option ROMs, QEMU's own blobs).
DEFAULT_FIRMWARE_DIRS = (
    "/usr/share/OVMF",
    "/usr/share/AAVMF",
    "/usr/share/edk2",
    "/usr/share/qemu",
    "/usr/share/qemu-efi-aarch64",
    "/usr/share/seabios",
    "/usr/lib/ipxe",
    "/usr/share/ipxe",
)

# The QEMU binaries distributions install (Debian/Ubuntu/Fedora/Arch: qemu-system-*; RHEL/CentOS: qemu-kvm).
DEFAULT_EMULATORS = ("/usr/bin/qemu-system-*", "/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm")
# Where libvirt keeps per-domain UEFI variable stores (created from the firmware's template).
DEFAULT_NVRAM_DIRS = ("/var/lib/libvirt/qemu/nvram",)
# Kernel parameters a host may set for a signed kernel whose manifest says nothing about the command line:
# console and logging, and the root device (every disk is verified anyway). Nothing that picks the program
# the kernel runs first (init=, rdinit=, systemd.*, rd.*, --) or switches off a protection.
DEFAULT_CMDLINE_PARAMS = (
    "console=*",
    "earlycon",
    "earlycon=*",
    "earlyprintk=*",
    "loglevel=*",
    "quiet",
    "panic=*",
    "no_timer_check",
    "root=/dev/*",
    "root=UUID=*",
    "root=PARTUUID=*",
    "root=LABEL=*",
    "ro",
    "rw",
    "rootwait",
)

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "trust": {"dir": str},
    "state": {"dir": str},
    "policy": {
        "mode": str,
        "exempt": list,
        "deadline_seconds": (int, float),
        "allow_cdrom": bool,
        "allow_network_disks": bool,
        "allow_block_devices": list,
        "allow_filesystems": bool,
        "allow_hostdev": bool,
        "allow_acpi_tables": bool,
        "allow_fwcfg": bool,
        "firmware_dirs": list,
        "emulators": list,
        "nvram_dirs": list,
        "allow_cmdline_params": list,
        "allow_image_combinations": list,
        "allow_shmem": bool,
        "allow_restore": bool,
        "allow_incoming_migration": bool,
        "on_start": str,
        "action": str,
        "on_host_error": str,
        "check_interval_seconds": (int, float),
        "memory_check": bool,
        "envelope_index_dirs": list,
        "profile": str,
    },
    "audit": {"log": str, "syslog": bool},
    "daemon": {
        "socket": str,
        "workers": int,
        "metrics_textfile": str,
        "metrics_port": int,
        "check_deadline_seconds": (int, float),
        "image_dirs": list,
    },
    "findings": {"action": dict, "allow": dict},
    "library": {"dir": str, "pool": str},
}


class Config:
    """Typed view of hostguard.toml. Plain class (not a dataclass): the hook imports it on every start."""

    def __init__(self, doc: dict[str, Any], source: Path) -> None:
        self.source = source
        trust = doc.get("trust", {})
        if "dir" not in trust:
            raise ConfigError(f"{source}: [trust] dir is required")
        self.trust_dir = Path(trust["dir"])
        self.state_dir = Path(doc.get("state", {}).get("dir", "/var/lib/hostguard/state"))
        policy = doc.get("policy", {})
        self.mode: str = policy.get("mode", "enforce")
        if self.mode not in MODES:
            raise ConfigError(f"{source}: [policy] mode must be one of {', '.join(MODES)}")
        self.exempt: tuple[str, ...] = tuple(_strings(policy.get("exempt", []), source, "[policy] exempt"))
        self.deadline_seconds = float(policy.get("deadline_seconds", 20))
        if not 0 < self.deadline_seconds <= 600:
            raise ConfigError(f"{source}: [policy] deadline_seconds must be in (0, 600]")
        self.allow_cdrom: bool = policy.get("allow_cdrom", False)
        self.allow_network_disks: bool = policy.get("allow_network_disks", False)
        self.allow_block_devices = _path_globs(policy.get("allow_block_devices", []), source, "allow_block_devices")
        # Host content other than disks that a domain can hand to its guest: off unless the admin allows it.
        self.allow_filesystems: bool = policy.get("allow_filesystems", False)
        self.allow_hostdev: bool = policy.get("allow_hostdev", False)
        self.allow_acpi_tables: bool = policy.get("allow_acpi_tables", False)
        self.allow_fwcfg: bool = policy.get("allow_fwcfg", False)
        fw_dirs = policy.get("firmware_dirs", list(DEFAULT_FIRMWARE_DIRS))
        self.firmware_dirs = _path_globs(fw_dirs, source, "firmware_dirs")
        # Host inputs that change what runs before the signed code does (ADR 0008).
        self.emulators = _path_globs(policy.get("emulators", list(DEFAULT_EMULATORS)), source, "emulators")
        self.nvram_dirs = _path_globs(policy.get("nvram_dirs", list(DEFAULT_NVRAM_DIRS)), source, "nvram_dirs")
        self.allow_cmdline_params = tuple(
            _strings(policy.get("allow_cmdline_params", list(DEFAULT_CMDLINE_PARAMS)), source, "allow_cmdline_params")
        )
        for param in self.allow_cmdline_params:
            if not param.isascii() or not param.isprintable() or " " in param or '"' in param:
                raise ConfigError(f"{source}: [policy] allow_cmdline_params entry {param!r} is not one parameter")
        self.allow_image_combinations = tuple(
            frozenset(_strings(combo, source, "each of [policy] allow_image_combinations"))
            for combo in policy.get("allow_image_combinations", [])
        )
        self.allow_shmem: bool = policy.get("allow_shmem", False)
        # A stack's host-made disks (config drive, ephemeral and swap bases) checked by their bytes (ADR 0016).
        self.profile: str = policy.get("profile", "none")
        if self.profile not in ("none", "nova", "kubevirt"):
            raise ConfigError(f"{source}: [policy] profile must be none, nova or kubevirt")
        # Where an envelope is found by the digest of the image the hook opened (`<sha256>.hgsig`) when none sits
        # beside it (issue 15): the digest selects, the name of the image is never trusted.
        self.envelope_index_dirs = tuple(
            Path(d) for d in _strings(policy.get("envelope_index_dirs", []), source, "[policy] envelope_index_dirs")
        )
        for d in self.envelope_index_dirs:
            if not d.is_absolute():
                raise ConfigError(f"{source}: [policy] envelope_index_dirs entry {str(d)[:80]!r} must be absolute")
        self.allow_restore: bool = policy.get("allow_restore", False)
        self.allow_incoming_migration: bool = policy.get("allow_incoming_migration", False)
        self.on_start: str = policy.get("on_start", "check")
        if self.on_start not in ("check", "quarantine"):
            raise ConfigError(f"{source}: [policy] on_start must be check or quarantine")
        self.action: str = policy.get("action", "pause")
        if self.action not in ACTIONS:
            raise ConfigError(f"{source}: [policy] action must be one of {', '.join(ACTIONS)}")
        # A post-start check that fails on the host's own set-up (trust store, state directory) judges nothing
        # about the guest: logged by default; a site that wants every guest stopped then says "pause" (ADR 0011).
        self.on_host_error: str = policy.get("on_host_error", "log")
        if self.on_host_error not in ACTIONS:
            raise ConfigError(f"{source}: [policy] on_host_error must be one of {', '.join(ACTIONS)}")
        self.check_interval_seconds = float(policy.get("check_interval_seconds", 600))
        self.memory_check: bool = policy.get("memory_check", True)
        audit = doc.get("audit", {})
        self.audit_log = Path(audit.get("log", DEFAULT_AUDIT_LOG))
        self.syslog: bool = audit.get("syslog", True)
        daemon = doc.get("daemon", {})
        self.daemon_socket = Path(daemon.get("socket", "/run/hostguard/hostguard.sock"))
        self.daemon_workers: int = daemon.get("workers", 2)
        if not 1 <= self.daemon_workers <= 16:
            raise ConfigError(f"{source}: [daemon] workers must be 1..16")
        self.check_deadline_seconds = float(daemon.get("check_deadline_seconds", 900))
        if not 1 <= self.check_deadline_seconds <= 86400:
            raise ConfigError(f"{source}: [daemon] check_deadline_seconds must be in [1, 86400]")
        self.metrics_textfile = Path(daemon["metrics_textfile"]) if "metrics_textfile" in daemon else None
        self.metrics_port: int | None = daemon.get("metrics_port")
        # Directories whose images hostguardd hashes ahead of a start and keeps under a read lease (ADR 0021);
        # None: the library, the envelope index directories and, under the nova profile, Nova's image cache.
        self.image_dirs: tuple[Path, ...] | None = None
        if "image_dirs" in daemon:
            self.image_dirs = tuple(Path(d) for d in _strings(daemon["image_dirs"], source, "[daemon] image_dirs"))
            if not all(d.is_absolute() for d in self.image_dirs):
                raise ConfigError(f"{source}: [daemon] image_dirs entries must be absolute paths")
        library = doc.get("library", {})
        self.library_dir = Path(library.get("dir", "/var/lib/hostguard/library"))
        self.library_pool: str = library.get("pool", "hostguard")
        findings = doc.get("findings", {})
        self.finding_actions: dict[str, Any] = findings.get("action", {})
        self.finding_allow: dict[str, Any] = findings.get("allow", {})
        self._finding_policy: FindingPolicy | None = None

    def finding_policy(self) -> FindingPolicy:
        """`[findings]` as a policy. The daemon and `hostguard start` build it when they load the configuration,
        so a typo stops them at once with one line instead of turning every verdict into "error"."""
        if self._finding_policy is None:
            # lazy: only post-start needs it, and its dataclasses cost the hook ~9 ms
            from hostguard.signed.findings import finding_policy

            try:
                self._finding_policy = finding_policy(self.action, self.finding_actions, self.finding_allow)
            except ConfigError as exc:
                raise ConfigError(f"{self.source}: {exc}") from None
        return self._finding_policy

    def admits_unverified(self, source_kind: str, path: str | None) -> str | None:
        """The policy key that lets a disk of this source kind (and path) through unverified, or None. The hook's
        decision and the post-start hot-plug stage both ask here, so they cannot disagree."""
        if source_kind == "network" and self.allow_network_disks:
            return "allow_network_disks"
        if source_kind == "block" and path is not None:
            # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
            from hostguard.domain.paths import glob_match

            if any(glob_match(path, g) for g in self.allow_block_devices):
                return "allow_block_devices"
        return None

    def exemption_for(self, domain_name: str) -> str | None:
        """The exempting glob, when the domain is out of scope. Matched against the name exactly as libvirt
        has it (the domain XML parser strips nothing): `exempt = ["scratch"]` does not exempt "scratch\u00a0"."""
        return next((g for g in self.exempt if fnmatch.fnmatchcase(domain_name, g)), None)


def _strings(value: object, source: Path, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{source}: {what} must be a list of non-empty strings")
    return value


def _path_globs(value: object, source: Path, key: str) -> tuple[str, ...]:
    """Absolute path globs, matched component by component (`hostguard.domain.paths.glob_match`)."""
    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
    from hostguard.domain.paths import glob_problem

    globs = tuple(_strings(value, source, f"[policy] {key}"))
    for glob in globs:
        why = glob_problem(glob)
        if why is not None:
            raise ConfigError(f"{source}: [policy] {key} entry {glob[:80]!r} {why}")
    return globs


def _validate(doc: dict[str, Any], source: Path) -> None:
    for section, body in doc.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in body.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                raise ConfigError(f"{source}: unknown key {key!r} in [{section}]")
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise ConfigError(f"{source}: [{section}] {key} has the wrong type")


def config_path() -> Path:
    return Path(os.environ.get("HOSTGUARD_CONFIG") or DEFAULT_PATH)


def load_config(path: Path | None = None) -> Config:
    # lazy: on the hook's start-up path, needed only when a cache misses or on a rarer branch
    from hostguard.host import minitoml

    source = path or config_path()
    # Whoever can write the configuration chooses the trust and state directories: root (or us) only.
    check_secure(source, "configuration file")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    # The plain subset of TOML is read without tomllib (~5 ms to import); anything else goes to tomllib.
    doc = minitoml.loads(text)
    if doc is None:
        import tomllib

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    _validate(doc, source)
    config = Config(doc, source)
    # Checked here too (not only where they are read), so the daemon and the hook refuse at start, in one line.
    check_secure(config.trust_dir, "trust directory")
    check_secure(config.state_dir, "state directory")
    return config
