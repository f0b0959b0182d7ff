"""Fixed names of the boot channel, shared by the host, the guest agent and the pre-boot hook (no imports)."""

OEM_PREFIX = "hgowner1:"  # SMBIOS type 11 string carrying the boot token
FWCFG_NAME = "opt/org.hostguard/owner-k"  # fw_cfg entry carrying K (shared-secret)
BOOT_PORT = "org.hostguard.boot.0"  # virtio-serial port: host query <-> guest announcement
OWNER_PORT = "org.hostguard.owner.0"  # virtio-serial port: the owner's TLS session
DEFAULT_RUN_DIR = "/run/hostguard/bootchannel"  # host: K files and channel sockets (tmpfs)
