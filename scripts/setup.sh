#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 host, run as root by `make demo` and `make test`:
# Debian packages, the project venv, and running virtlogd + libvirtd (started by hand when there is no systemd).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "setup: must run as root (libvirt, /boot and /etc/libvirt/hooks need it)" >&2; exit 2; }

DEB_PACKAGES=(
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  libguestfs-tools python3-guestfs python3-libvirt python3-venv
  linux-image-amd64 busybox-static supermin e2fsprogs openssl gdisk make cpio zstd xz-utils debootstrap libcap2-bin
  # XFS and LVM2 test images for the fast reader (mkfs.xfs, lvcreate on loop devices)
  xfsprogs lvm2
  # Btrfs test images (mkfs.btrfs, subvolumes on loop devices)
  btrfs-progs
  # packaging tests: the .deb (make deb), lintian, systemd-analyze verify, logrotate, groff for the man pages
  dh-virtualenv debhelper lintian systemd logrotate groff-base
  # stack tests: Nova's config drive (ISO 9660 labelled config-2), vfat config drives and KubeVirt's NoCloud seed
  genisoimage dosfstools
  # OCI library tests: a registry (distribution) on loopback, and bcrypt htpasswd for its basic auth
  docker-registry apache2-utils
  # fault tests: a FUSE file system that never answers a read (tests/testbed/hungfs.py)
  python3-fusepy
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# libguestfs's supermin appliance needs a readable kernel in /boot.
chmod 0644 /boot/vmlinuz-* 2>/dev/null || true

bash scripts/venv.sh

# The hook starts on every VM start: never let it compile Python at start-up (PYTHONDONTWRITEBYTECODE may be
# set in the environment; compileall writes the bytecode regardless).
.venv/bin/python -m compileall -q hostguard >/dev/null

bash scripts/libvirtd.sh start
.venv/bin/hostguard --version >/dev/null
log "ready"
