"""A bootable Debian 12 guest with systemd: debootstrap (minbase + systemd-sysv) from the mirror apt uses, booted
with the test bed's kernel and busybox initramfs (root /dev/vda, read-write with `hostguard.rw=1`), cached in
the test bed like the other guests.

Two units of its own: `hostguard-ready` prints the marker on the serial console once multi-user.target is
reached, `hostguard-activity` keeps the guest doing ordinary things (logs under /var/log through journald and
a file, files in /tmp, a package-cache file under /var/cache) so the post-start checks see a live, writing guest;
`hostguard-install` installs a package when the kernel command line asks for it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from tests.testbed import images
from tests.testbed.debian import SUITE, apt_mirror
from tests.testbed.guests import Guest

MARKER = "HOSTGUARD-DEBIAN-READY"
PACKAGES = ("systemd-sysv", "iputils-ping", "libcap2-bin")
ROOT_MB = 1024

READY_UNIT = f"""[Unit]
Description=hostguard test bed: the guest is up
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{MARKER} kernel=$(uname -r) init=$(cat /proc/1/comm)" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

ACTIVITY_UNIT = """[Unit]
Description=hostguard test bed: ordinary guest activity

[Service]
ExecStart=/bin/sh -c 'n=0; while :; do n=$((n + 1)); echo "activity $n"; date >> /var/log/hostguard-activity.log; \
echo $n > /tmp/activity-$((n % 10)); date > /var/cache/apt/hostguard-stamp; sleep 3; done'

[Install]
WantedBy=multi-user.target
"""


# With `hostguard.install=1` on the kernel command line the guest installs a package by itself once it is up
# (dpkg -i of Debian's `hello`, fetched with the host's apt when the image is built): new executables that the
# signed manifest does not list.
INSTALL_MARKER = "HOSTGUARD-INSTALLED"
INSTALL_PACKAGE = "hello"
INSTALL_UNIT = f"""[Unit]
Description=hostguard test bed: install a package when asked on the kernel command line
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'grep -qw hostguard.install=1 /proc/cmdline || exit 0; sleep 20; \
dpkg -i /root/{INSTALL_PACKAGE}.deb && sync && echo "{INSTALL_MARKER} $(command -v {INSTALL_PACKAGE})" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""


def _enable(tree: Path, unit: str, text: str) -> None:
    path = tree / "etc/systemd/system" / unit
    path.write_text(text)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")


def build_tree(tree: Path) -> None:
    images.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, tree, apt_mirror()])
    # The initramfs checks /newroot/sbin/init before switch_root: an absolute link would resolve in the initramfs.
    init = tree / "usr/sbin/init"
    if init.is_symlink() and os.readlink(init).startswith("/"):
        init.unlink()
        init.symlink_to("../lib/systemd/systemd")
    (tree / "etc/hostname").write_text("hgt-debian\n")
    _enable(tree, "hostguard-ready.service", READY_UNIT)
    _enable(tree, "hostguard-activity.service", ACTIVITY_UNIT)
    _enable(tree, "hostguard-install.service", INSTALL_UNIT)
    with tempfile.TemporaryDirectory(prefix="hgt-deb-") as tmp:
        images.run(["apt-get", "download", INSTALL_PACKAGE], cwd=Path(tmp))
        (deb,) = Path(tmp).glob(f"{INSTALL_PACKAGE}_*.deb")
        shutil.copyfile(deb, tree / "root" / f"{INSTALL_PACKAGE}.deb")
    shutil.rmtree(tree / "var/cache/apt/archives", ignore_errors=True)
    (tree / "var/cache/apt/archives/partial").mkdir(parents=True)


def debian_systemd_guest(base: Guest) -> Guest:
    """The Debian 12 systemd guest, booted like `base` (the busybox guest: same kernel and initramfs)."""

    def build(out: Path) -> None:
        tree = out / "tree"
        build_tree(tree)
        raw = images.make_ext4(tree, out / "root.raw", size_mb=ROOT_MB, label="hgt-debian")
        images.to_qcow2(raw, out / "root.qcow2")
        shutil.rmtree(tree)
        for f in out.iterdir():
            f.chmod(0o644)

    key = [SUITE, *PACKAGES, apt_mirror(), *images.source_key("debian_boot.py", "debian.py", "images.py")]
    key += images.package_versions("debootstrap", "e2fsprogs", "qemu-utils")
    key.append(images.run(["apt-cache", "policy", INSTALL_PACKAGE]).split("Candidate:", 1)[-1].split()[0])
    entry = images.cached(key, build, name="debian12-systemd")
    return dataclasses.replace(
        base, name="debian", root_qcow2=entry / "root.qcow2", root_raw=entry / "root.raw", expected={}, marker=MARKER
    )
